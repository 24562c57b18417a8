"""The client: a run whose rows a background thread sends to the server about once a second.

Nothing here blocks or raises into the training loop. `log` appends to an in-memory list under a lock;
the sender thread takes what is there, sends it, and when the server cannot be reached appends it to a
spool file (JSON lines, under `~/.stepscope/spool` unless told otherwise) that it replays, oldest first,
once the server answers again. The ingest API is idempotent on (run, step), so a batch sent twice (sent,
then spooled because the answer was lost) is recorded once. A run whose process ends without `finish`
is finished `interrupted` at exit; if the server is down then, the spool keeps that too, and the next
`stepscope.init` (or `stepscope.replay_spool()`) on this machine sends it. A killed process (SIGKILL)
runs no code at all: the server marks its run interrupted once its heartbeat stops.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("stepscope")

DEFAULT_SERVER = "http://127.0.0.1:8000"
SEND_SECONDS = 1.0
MAX_ROWS_PER_REQUEST = 5000
REQUEST_TIMEOUT = 10.0
FILE_TIMEOUT = 300.0
"""A run's file (a checkpoint, the map's snapshots: tens of MB) may take a while over a slow link."""
NON_FINITE_ALLOWED = {"loss", "grad_norm", "eval_loss"}
"""Values the server stores even when non-finite (a diverging run); any other non-finite value is sent as null."""
INTEGER_KEYS = {"samples", "tokens", "skipped"}
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_./:-]")


class _Unreachable(Exception):
    """The server did not answer, or answered 5xx: try again later."""


def _clean_key(key: str) -> str:
    """A metric name the server takes: letters, digits and _ . / : -, starting with a letter or _ (100 at most)."""
    name = _BAD_KEY_CHARS.sub("_", str(key))[:100] or "_"
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"[:100]


def _number(key: str, value: Any) -> float | int | None | bool:
    """A logged value as the server takes it; False when it is no number at all (dropped)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    if not math.isfinite(number):
        return number if key in NON_FINITE_ALLOWED else None
    return int(number) if key in INTEGER_KEYS else number


class _Spool:
    """One run's spool file: JSON lines of requests not yet sent, the first line naming the run.

    The file is locked while its process lives, so `replay_spool` never takes over a running client's file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[str] | None = None

    def lock(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.with_suffix(".lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock = handle
        return True

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            with contextlib.suppress(OSError):
                if not self.path.exists():
                    self.path.with_suffix(".lock").unlink()

    def append(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a crash
                records.append(json.loads(line))
        return records

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        if not records:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        partial = self.path.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        partial.replace(self.path)


class _Transport:
    def __init__(self, server: str, token: str | None) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The answer's JSON (None when empty); _Unreachable to retry later; ValueError when refused (4xx)."""
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.server + path, data=data, headers=self.headers, method="POST")
        text = self._open(request, path, REQUEST_TIMEOUT)
        return json.loads(text) if text else None

    def put_file(self, path: str, data: bytes) -> None:
        """Upload raw bytes (a run's file, trainer.http_recorder); the same errors as `post`."""
        headers = self.headers | {"Content-Type": "application/octet-stream"}
        request = urllib.request.Request(self.server + path, data=data, headers=headers, method="PUT")
        self._open(request, path, FILE_TIMEOUT)

    def get_bytes(self, path: str) -> bytes:
        """The body of a GET (a run's file or its list); the same errors as `post`."""
        return self._open(urllib.request.Request(self.server + path, headers=self.headers), path, FILE_TIMEOUT)

    def _open(self, request: urllib.request.Request, path: str, timeout: float) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                body: bytes = answer.read()
                return body
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code >= 500 or exc.code == 429:
                raise _Unreachable(f"{exc.code}: {detail}") from None
            raise ValueError(f"the server refused {path} ({exc.code}): {detail}") from None
        except (OSError, TimeoutError) as exc:  # URLError is an OSError: refused, reset, timed out
            raise _Unreachable(str(exc)) from None


def _send(transport: _Transport, run_id: int | None, record: dict[str, Any]) -> int | None:
    """Send one spooled request; the run's id (known once `create` went through)."""
    op = record["op"]
    if op == "run":
        return int(record["id"])
    if op == "create":
        if run_id is not None:
            return run_id
        created = transport.post("/api/external-runs", record["body"])
        assert created is not None
        return int(created["id"])
    if run_id is None:
        raise ValueError("a spool without its run")
    if op in ("steps", "evals"):
        transport.post(f"/api/runs/{run_id}/{op}", {"rows": record["rows"]})
    elif op == "finish":
        transport.post(f"/api/runs/{run_id}/finish", record["body"])
    elif op == "heartbeat":
        transport.post(f"/api/runs/{run_id}/heartbeat")
    return run_id


def _replay(transport: _Transport, spool: _Spool, run_id: int | None) -> int | None:
    """Send a spool's requests in order; keep the ones not sent (from the first that could not be)."""
    records = spool.read()
    for i, record in enumerate(records):
        try:
            run_id = _send(transport, run_id, record)
        except _Unreachable:
            head = [{"op": "run", "id": run_id}] if run_id is not None else []
            rest = [r for r in records[i:] if r["op"] not in ("run", "create") or run_id is None]
            spool.rewrite(head + rest)
            raise
        except ValueError as exc:  # refused for good (a finished run, bad rows): drop it, keep the rest
            log.warning("stepscope: %s", exc)
    spool.rewrite([])
    return run_id


class Run:
    """A run being recorded. `log` and `finish` never raise and never wait for the network."""

    def __init__(
        self,
        server: str,
        name: str,
        config: dict[str, Any],
        token: str | None,
        spool_dir: Path,
        *,
        source: str = "script",
        learning_rate: float | None = None,
        heartbeat_seconds: float = 60,
        send_seconds: float = SEND_SECONDS,
    ) -> None:
        self.name = name
        self.id: int | None = None
        self.finished = False
        self._transport = _Transport(server, token)
        self._spool = _Spool(spool_dir / f"{uuid.uuid4().hex}.jsonl")
        self._spool.lock()
        self._send_seconds = send_seconds
        self._heartbeat_every = max(1.0, heartbeat_seconds / 4)
        self._lock = threading.Lock()
        self._steps: dict[int, dict[str, Any]] = {}
        self._evals: dict[int, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []  # requests other than rows (create, finish), in order
        self._last_step = 0
        self._start = time.monotonic()
        self._last_sent = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        body = {"name": name, "config": _json_safe(config), "source": source, "heartbeat_seconds": heartbeat_seconds}
        if learning_rate is not None and learning_rate > 0 and math.isfinite(learning_rate):
            body["learning_rate"] = float(learning_rate)
        try:  # the run's id, at once if the server answers; else the spool creates it later
            self.id = _send(self._transport, None, {"op": "create", "body": body})
        except (_Unreachable, ValueError) as exc:
            log.warning("stepscope: cannot create the run now (%s); recording to %s", exc, self._spool.path)
            self._pending.append({"op": "create", "body": body})
        self._thread = threading.Thread(target=self._loop, name="stepscope-sender", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # --- the training loop's side ---

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record scalars at `step` (default: the last step + 1). Standard names (loss, lr, grad_norm, ...) go
        to their columns; any other number is a custom metric; names starting with `eval_` at a step go
        to the evaluations when `eval_loss` is among them."""
        try:
            self._log(metrics, step)
        except Exception:  # never into the training loop
            log.exception("stepscope: could not record a row")

    def _log(self, metrics: dict[str, Any], step: int | None) -> None:
        with self._lock:
            step = self._last_step + 1 if step is None else int(step)
            self._last_step = max(self._last_step, step)
            is_eval = "eval_loss" in metrics
            target = (self._evals if is_eval else self._steps).setdefault(step, {"step": step})
            if not is_eval:
                target.setdefault("wall_time", round(time.monotonic() - self._start, 6))
            for key, value in metrics.items():
                name = _clean_key(key)
                number = _number(name, value)
                if number is not False and name != "step":
                    target[name] = number
        if len(self._steps) >= MAX_ROWS_PER_REQUEST:
            self._wake.set()

    def finish(self, status: str = "completed", timeout: float = 30.0) -> None:
        """End the run (completed, failed, cancelled, interrupted or diverged) after sending what is left.

        Waits at most `timeout` seconds for the server; what it could not send stays in the spool.
        """
        if self.finished:
            return
        self.finished = True
        with self._lock:
            self._pending.append({"op": "finish", "body": {"status": status}})
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # still trying: leave the rest to the spool
            log.warning("stepscope: the server did not take the last rows in time; they wait in %s", self._spool.path)
        self._spool.unlock()
        with contextlib.suppress(Exception):
            atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        if not self.finished:
            self.finish("interrupted", timeout=10.0)

    # --- the sender thread ---

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            steps, evals, pending = self._steps, self._evals, self._pending
            self._steps, self._evals, self._pending = {}, {}, []
        records = [r for r in pending if r["op"] == "create"]
        rows = [steps[s] for s in sorted(steps)]
        records += [
            {"op": "steps", "rows": rows[i : i + MAX_ROWS_PER_REQUEST]}
            for i in range(0, len(rows), MAX_ROWS_PER_REQUEST)
        ]
        if evals:
            records.append({"op": "evals", "rows": [evals[s] for s in sorted(evals)]})
        records += [r for r in pending if r["op"] != "create"]
        if not records and time.monotonic() - self._last_sent >= self._heartbeat_every:
            records.append({"op": "heartbeat"})
        return records

    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._pass()
            except Exception:  # a bug here must not end the thread silently with rows in memory
                log.exception("stepscope: sending failed")
            if stopping and not self._spool.path.exists():
                return
            if stopping:  # the server is down at the end: keep trying until finish's timeout gives up
                time.sleep(0.5)
                continue
            self._wake.wait(self._send_seconds)
            self._wake.clear()

    def _pass(self) -> None:
        records = self._take()
        if self._spool.path.exists():  # order matters: what waits in the spool goes first
            self._spool.append([r for r in records if r["op"] != "heartbeat"])
            records = []
            try:
                self.id = _replay(self._transport, self._spool, self.id)
                self._last_sent = time.monotonic()
            except _Unreachable:
                return
        for i, record in enumerate(records):
            try:
                self.id = _send(self._transport, self.id, record)
                self._last_sent = time.monotonic()
            except _Unreachable as exc:
                log.warning("stepscope: server unreachable (%s); spooling to %s", exc, self._spool.path)
                head = [{"op": "run", "id": self.id}] if self.id is not None else []
                self._spool.append(head + [r for r in records[i:] if r["op"] != "heartbeat"])
                return
            except ValueError as exc:
                log.warning("stepscope: %s", exc)


def _json_safe(value: Any) -> Any:
    """A config as JSON the server takes: non-finite numbers as text, other objects as their str()."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _default_spool_dir() -> Path:
    return Path(os.environ.get("STEPSCOPE_SPOOL_DIR") or Path.home() / ".stepscope" / "spool")


def replay_spool(server: str = DEFAULT_SERVER, token: str | None = None, spool_dir: str | Path | None = None) -> int:
    """Send what runs of ended processes left in the spool (their rows, their `interrupted`); how many spools
    were sent whole. Files of live clients are left alone."""
    folder = Path(spool_dir) if spool_dir else _default_spool_dir()
    transport, done = _Transport(server, token), 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        spool = _Spool(path)
        if not spool.lock():
            continue
        try:
            _replay(transport, spool, None)
            done += 1
        except _Unreachable:
            break
        finally:
            spool.unlock()
    return done


def init(
    server: str | None = None,
    name: str = "",
    config: dict[str, Any] | None = None,
    token: str | None = None,
    *,
    spool_dir: str | Path | None = None,
    source: str = "script",
    learning_rate: float | None = None,
    heartbeat_seconds: float = 60,
    handle_sigterm: bool = True,
) -> Run:
    """Start recording a run on the server (`STEPSCOPE_SERVER`, else http://127.0.0.1:8000).

    `token`: the server's STEPSCOPE_TOKEN, if it has one (default: the environment's). `heartbeat_seconds`:
    how long the server waits for news before it marks the run interrupted (the process died).
    `handle_sigterm`: finish the run `interrupted` on SIGTERM when no other handler is installed.
    """
    server = server or os.environ.get("STEPSCOPE_SERVER") or DEFAULT_SERVER
    token = token if token is not None else os.environ.get("STEPSCOPE_TOKEN")
    folder = Path(spool_dir) if spool_dir else _default_spool_dir()
    with contextlib.suppress(Exception):  # never into the training loop
        replay_spool(server, token, folder)
    run = Run(
        server,
        name,
        dict(config or {}),
        token,
        folder,
        source=source,
        learning_rate=learning_rate,
        heartbeat_seconds=heartbeat_seconds,
    )
    if handle_sigterm:
        _finish_on_sigterm(run)
    return run


def _finish_on_sigterm(run: Run) -> None:
    """On SIGTERM, finish the run `interrupted`, then die of the signal as the process would have."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the script (or its framework) handles it; atexit still marks the run

    def on_term(signum: int, frame: Any) -> None:
        run.finish("interrupted", timeout=5.0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
