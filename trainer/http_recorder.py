"""Records a run over the server's ingest API instead of into its database: a job on another machine (a Ray
worker) trains and records without touching the server's SQLite file.

Same interface as `trainer.recorder.Recorder` (steps, evals, update_run, flush, close, error), same
promise: the training loop hands rows over and never waits for the network. One sender thread posts
what has queued up, in order (a run's columns after the rows before them), through the stepscope
client's transport (`stepscope.client`). While the server cannot be reached (restarting, say) the
requests wait and are retried, oldest first; the ingest API is idempotent on (run, step), so a batch
whose answer was lost and that is sent again is recorded once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from stepscope.client import MAX_ROWS_PER_REQUEST, NON_FINITE_ALLOWED, _Transport, _Unreachable
from store.generations import GenerationRow
from store.landscape import SNAPSHOTS_FILE, ModuleRow, ProbeRow
from store.scalars import ScalarRow
from store.tables import STEP_COLUMNS
from trainer import checkpoints
from trainer.recorder import QueuedRecorder

ANSWER_FIELDS = ("prompt_index", "prompt", "expected", "output", "exact", "overlap")  # a GenerationRow after its step
log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = 0.5
CLOSE_WAIT_SECONDS = 120.0
"""How long `close` keeps trying to reach a server that is down before the rows are given up."""


def fetch_run(server: str, token: str | None, run_id: int) -> tuple[dict[str, Any], str]:
    """(config dict, status) of a run, from GET /api/runs/{id}; KeyError if there is none."""
    import urllib.error
    import urllib.request

    transport = _Transport(server, token)
    request = urllib.request.Request(f"{transport.server}/api/runs/{run_id}", headers=transport.headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            run = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise KeyError(run_id) from None
        raise
    return run["config"], run["status"]


def _value(name: str, value: Any) -> Any:
    """A column's value as JSON: times in ISO form, statuses by name, non-finite metrics as null."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value) and name not in NON_FINITE_ALLOWED:
        return None
    if isinstance(value, dict):  # a run's summary: JSON has no NaN
        return {str(k): _value("", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_value("", v) for v in value]
    return value


class HttpRecorder(QueuedRecorder):
    """Queue rows from the training loop; one thread posts them to the server. `close()` drains and joins.

    `send_files`: the job's run folder is not the server's (a node without the server's data directory), so
    the files the server reads (adapter, checkpoints, snapshots) go to it too, in order with the rows
    (`PUT /api/runs/{id}/files/...`, app.routers.run_files), and a resumed run fetches its checkpoint."""

    def __init__(self, server: str, run_id: int, token: str | None = None, send_files: bool = False) -> None:
        self.server = server
        self.send_files = send_files
        self._transport = _Transport(server, token)
        super().__init__(run_id, "stepscope-http-recorder")

    # --- called from the training loop -----------------------------------------------------------

    def steps(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows of (step, *STEP_COLUMNS)."""
        if rows:
            names = ("step", *STEP_COLUMNS)
            self._queue.put(("steps", [{n: _value(n, v) for n, v in zip(names, row, strict=True)} for row in rows]))

    def evals(self, rows: list[tuple[int, float | None, float]]) -> None:
        """Rows of (step, eval_loss, wall_time)."""
        if rows:
            self._queue.put(("evals", [{"step": s, "eval_loss": e, "wall_time": w} for s, e, w in rows]))

    def walk(self, probes: list[ProbeRow], modules: list[ModuleRow], scalars: list[ScalarRow]) -> None:
        """What trainer.landscape measured; the per-group rates go in as custom keys of their steps."""
        if probes:
            rows = [{"step": s, "alphas": a, "losses": v, "best_alpha": b} for s, a, v, b in probes]
            self._queue.put(("probes", rows))
        if modules:
            rows = [{"step": s, "update_norms": u, "param_norms": p} for s, u, p in modules]
            self._queue.put(("module-norms", rows))
        if scalars:
            self._queue.put(("steps", [{"step": step, key: _value(key, v)} for key, step, v in scalars]))

    def generations(self, step: int, rows: list[GenerationRow], metrics: dict[str, float]) -> None:
        """An eval step's answers and their scores (POST /api/runs/{id}/generations)."""
        if rows or metrics:
            answers = [dict(zip(ANSWER_FIELDS, row[1:], strict=True)) for row in rows]
            self._queue.put(("generations", [{"step": step, "answers": answers, "metrics": metrics}]))

    def files(self, run_dir: Path, paths: list[str]) -> None:
        if self.send_files and paths:
            self._queue.put(("files", [(run_dir, path) for path in paths]))

    def fetch_checkpoint(self, run_dir: Path) -> None:
        if not self.send_files:
            return
        listed = json.loads(self._get(f"/api/runs/{self.run_id}/files"))["files"]
        names = [f["path"] for f in listed]
        newest = max((n for n in names if n.startswith(f"{checkpoints.CHECKPOINT_FOLDER}/")), default=None)
        here = checkpoints.latest(run_dir)
        if newest is None or (here is not None and checkpoints.relative(here, run_dir) >= newest):
            return  # the step is zero-padded: the names sort as the steps do
        data = self._get(f"/api/runs/{self.run_id}/files/{newest}")
        step = int(Path(newest).parent.name.removeprefix(checkpoints.PREFIX))
        checkpoints.place(run_dir, step, lambda target: target.write_bytes(data))
        if SNAPSHOTS_FILE in names:  # the map's snapshots up to the checkpoint (trainer.landscape reads them back)
            part = run_dir / f".{SNAPSHOTS_FILE}.part"
            part.write_bytes(self._get(f"/api/runs/{self.run_id}/files/{SNAPSHOTS_FILE}"))
            os.replace(part, run_dir / SNAPSHOTS_FILE)
        log.info("run %d: fetched checkpoint %s from the server", self.run_id, newest)

    def _get(self, path: str) -> bytes:
        """A GET of the server's, retried while it cannot be reached (up to CLOSE_WAIT_SECONDS)."""
        return _retried(lambda: self._transport.get_bytes(path), time.monotonic() + CLOSE_WAIT_SECONDS)

    def update_run(self, **fields: Any) -> None:
        """Set columns of this run's row, in order with the rows queued before."""
        self._queue.put(("job", {name: _value(name, value) for name, value in fields.items()}))

    def recorded(self, upto: int) -> tuple[list[tuple[Any, ...]], list[tuple[int, float | None, float]]]:
        """The rows and evals the run recorded up to step `upto` (a resumed run's history), from its CSV export."""
        import csv
        import io
        import urllib.request

        url = f"{self._transport.server}/api/runs/{self.run_id}/metrics.csv"
        request = urllib.request.Request(url, headers=self._transport.headers)
        with urllib.request.urlopen(request, timeout=120) as answer:
            table = csv.reader(io.StringIO(answer.read().decode()))
        header = next(table)
        at = {name: i for i, name in enumerate(header)}
        rows: list[tuple[Any, ...]] = []
        evals: list[tuple[int, float | None, float]] = []
        for line in table:
            step = int(line[0])
            if step > upto:
                break
            if any(line[at[c]] for c in STEP_COLUMNS):
                rows.append((step, *(float(line[at[c]]) if line[at[c]] else None for c in STEP_COLUMNS)))
            if line[at["eval_loss"]]:
                evals.append((step, float(line[at["eval_loss"]]), 0.0))
        return rows, evals

    # --- the sender thread -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            for batch, closing in self._batches():  # what queued up meanwhile, in as few requests as it can
                self._send_all(_coalesce(batch), closing=closing)
        except BaseException as exc:  # reported by flush/close and the loop's next record()
            self.error = exc

    def _send_all(self, requests: list[tuple[str, Any]], closing: bool) -> None:
        give_up = time.monotonic() + CLOSE_WAIT_SECONDS if closing else None
        for op, body in requests:
            try:
                _retried(lambda: self._post(op, body), give_up)  # noqa: B023 (called at once, in this iteration)
            except ValueError as exc:
                if "(409)" not in str(exc):
                    raise
                return  # the run ended on the server (the runner settled it): nothing more to record

    def _post(self, op: str, body: Any) -> None:
        if op == "job":
            self._transport.post(f"/api/runs/{self.run_id}/job", {"fields": body})
        elif op == "files":
            for run_dir, path in body:
                self._send_file(run_dir, path)
        else:
            self._transport.post(f"/api/runs/{self.run_id}/{op}", {"rows": body})

    def _send_file(self, run_dir: Path, path: str) -> None:
        try:
            data = (run_dir / path).read_bytes()
        except FileNotFoundError:
            return  # an old checkpoint dropped before it could be sent: a newer one is on its way
        try:
            self._transport.put_file(f"/api/runs/{self.run_id}/files/{path}", data)
        except ValueError as exc:
            if "(413)" not in str(exc):
                raise
            # Over the server's STEPSCOPE_MAX_UPLOAD_BYTES: the rows matter more than this file; say so, go on.
            log.warning("run %d: the server refused %s (%d bytes) as too large", self.run_id, path, len(data))


def _retried(call: Callable[[], T], give_up: float | None) -> T:
    """`call()`, tried again while the server cannot be reached (it restarts, or the network hiccups), until
    the monotonic time `give_up` (None: for as long as it takes); the requests after it wait, in order."""
    while True:
        try:
            return call()
        except _Unreachable:
            if give_up is not None and time.monotonic() > give_up:
                raise
            time.sleep(RETRY_SECONDS)


def _coalesce(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Adjacent batches of the same kind as one request (at most MAX_ROWS_PER_REQUEST rows); column updates
    in a row as one, later values winning. The order between kinds is kept."""
    out: list[tuple[str, Any]] = []
    for op, body in items:
        if out and out[-1][0] == op:
            last = out[-1][1]
            if op == "job":
                last.update(body)
                continue
            if len(last) + len(body) <= MAX_ROWS_PER_REQUEST:
                last.extend(body)
                continue
        out.append((op, dict(body) if op == "job" else list(body)))
    return out
