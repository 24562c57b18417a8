"""Writes a run's rows into the project's SQLite database from one background thread.

The training loop hands over batches of finished rows and never waits for the disk: a single writer
thread owns the write connection and commits whatever has queued up in one transaction
(`executemany`), so SQLite sees few, large transactions. WAL lets the server read meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session

from store.db import configure_sqlite, make_engine
from store.generations import GENERATION_INSERT, GenerationRow
from store.landscape import MODULE_INSERT, PROBE_INSERT, ModuleRow, ProbeRow, module_values, probe_values
from store.processes import process_start_time
from store.rollups import STEP_INSERT, write_steps
from store.scalars import SCALAR_INSERT, ScalarRow
from store.tables import Run, RunStatus, sqlite_time
from trainer.config import TrainConfig

_STEP_SQL = STEP_INSERT  # queued step rows go through store.rollups.write_steps, which keeps their rollups too
_EVAL_SQL = "INSERT OR REPLACE INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)"
_RUN_COLUMNS = frozenset(Run.model_fields) - {"id"}
_CLOSE = object()


def new_run(database_url: str, cfg: TrainConfig) -> int:
    """Insert a run that this process is about to train and return its id.

    It is `running` with this pid from the start, so a server's job runner never starts it a second time.
    """
    pid = os.getpid()
    run = Run(**cfg.run_columns(), status=RunStatus.running, pid=pid, pid_start=process_start_time(pid))
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            session.add(run)
            session.commit()
            assert run.id is not None
            return run.id
    finally:
        engine.dispose()


def run_config(db_path: Path, run_id: int) -> tuple[dict[str, Any], str]:
    """(config dict, status) of an existing run; KeyError if there is none."""
    with sqlite3.connect(db_path) as conn:
        configure_sqlite(conn)
        row = conn.execute("SELECT config, status FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise KeyError(run_id)
    return json.loads(row[0]), row[1]


def run_process_alive(db_path: Path, run_id: int) -> bool:
    """Whether the process a run's row names (pid and start time) is still running."""
    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT pid, pid_start FROM runs WHERE id = ?", (run_id,)).fetchone()
    return bool(row and row[0] and row[1] is not None and process_start_time(row[0]) == row[1])


def _sql_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return sqlite_time(value)
    if isinstance(value, RunStatus):
        return value.value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


class QueuedRecorder:
    """What every recorder shares: the loop queues work and one thread does it, in order. The thread puts
    the `threading.Event`s it finds in the queue (`flush`) after all queued before them, and stops at
    `_CLOSE`; it keeps the first error in `error`."""

    def __init__(self, run_id: int, thread_name: str) -> None:
        self.run_id = run_id
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        raise NotImplementedError

    def _batches(self) -> Iterator[tuple[list[Any], bool]]:
        """For the thread: everything that queued up since the last batch (at least one item), and whether the
        recorder is closing; the `flush` events among them are set once the thread is done with the batch."""
        done = False
        while not done:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _CLOSE:
                batch.pop()
                done = True
            yield [item for item in batch if not isinstance(item, threading.Event)], done
            for event in batch:  # everything queued before it is done now
                if isinstance(event, threading.Event):
                    event.set()

    def flush(self) -> None:
        """Wait until every row queued so far is committed (a checkpoint must not run ahead of its rows)."""
        done = threading.Event()
        self._queue.put(done)
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        if self.error is not None:
            raise RuntimeError(f"recording failed: {self.error}") from self.error

    def close(self) -> None:
        self._queue.put(_CLOSE)
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"recording failed: {self.error}") from self.error

    def files(self, run_dir: Path, paths: list[str]) -> None:
        """The loop saved these files of the run (paths inside `run_dir`): a recorder whose run's folder is not
        the server's sends them (trainer.http_recorder); this one writes into the server's, so it has none."""

    def fetch_checkpoint(self, run_dir: Path) -> None:
        """Bring the run's newest checkpoint into `run_dir` from the server, if it has a newer one than here
        (a run resumed on another node); nothing to do where the run's folder is the server's."""


class Recorder(QueuedRecorder):
    """Queue rows from the training loop; one thread writes them. `close()` drains and joins."""

    def __init__(self, db_path: Path, run_id: int) -> None:
        self.db_path = db_path
        super().__init__(run_id, "stepscope-recorder")

    # --- called from the training loop -----------------------------------------------------------

    def steps(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows of (step, *STEP_COLUMNS)."""
        if rows:
            self._queue.put((_STEP_SQL, [(self.run_id, *row) for row in rows]))

    def evals(self, rows: list[tuple[int, float | None, float]]) -> None:
        """Rows of (step, eval_loss, wall_time)."""
        if rows:
            self._queue.put((_EVAL_SQL, [(self.run_id, *row) for row in rows]))

    def walk(self, probes: list[ProbeRow], modules: list[ModuleRow], scalars: list[ScalarRow]) -> None:
        """What trainer.landscape measured: probe curves, per-tensor norms and per-group rates."""
        if probes:
            self._queue.put((PROBE_INSERT, probe_values(self.run_id, probes)))
        if modules:
            self._queue.put((MODULE_INSERT, module_values(self.run_id, modules)))
        if scalars:
            self._queue.put((SCALAR_INSERT, [(self.run_id, *row) for row in scalars]))

    def generations(self, step: int, rows: list[GenerationRow], metrics: dict[str, float]) -> None:
        """An eval step's answers to the held-out prompts, and their scores as the run's scalars at that step."""
        if rows:
            self._queue.put((GENERATION_INSERT, [(self.run_id, *row) for row in rows]))
        if metrics:
            self._queue.put((SCALAR_INSERT, [(self.run_id, key, step, value) for key, value in metrics.items()]))

    def update_run(self, **fields: Any) -> None:
        """Set columns of this run's row, in order with the rows queued before."""
        unknown = set(fields) - _RUN_COLUMNS
        if unknown:
            raise ValueError(f"runs has no columns {sorted(unknown)}")
        names = sorted(fields)
        sql = f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
        values = (*(_sql_value(fields[n]) for n in names), self.run_id)
        if self.error is not None or not self._thread.is_alive():
            # The writer died (a full disk, a broken database file): the run's end must still be written,
            # or it would stay `running` for ever. One fresh connection, the row alone.
            with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as conn:
                configure_sqlite(conn)
                with conn:
                    conn.execute(sql, values)
            return
        self._queue.put((sql, [values]))

    # --- the writer thread -------------------------------------------------------------------------

    def _work(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        configure_sqlite(conn)
        # The run row exists before the first step and cannot be deleted while it runs (the API answers 409),
        # so checking the foreign key on every metric row only costs time (~25% of the insert rate).
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            for batch, _ in self._batches():  # everything that queued up meanwhile, in one transaction
                self._write(conn, batch)
        except BaseException as exc:  # reported by close(); the loop must not die silently
            self.error = exc
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        if not batch:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            steps: list[tuple[Any, ...]] = []
            for sql, rows in batch:
                if sql is _STEP_SQL:
                    steps += rows
                else:
                    conn.executemany(sql, rows)
            # All the step rows at once, with the rollups of the blocks they fall in: in the same
            # transaction, so that a reader never sees rows without their rollups.
            write_steps(conn, self.run_id, steps)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
