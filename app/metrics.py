"""Metric reads: every step of a run, fast, or a downsampled view in which every spike survives.

Reads go through raw sqlite3 cursors with only the requested columns; no ORM objects are built for
metric rows. When every point is wanted, SQLite itself writes the JSON arrays (`json_group_array`),
which is several times faster than turning 20,000 rows into Python floats and encoding them again.

Downsampling is min/max per bucket: for each bucket of consecutive steps and each requested series,
the steps holding the bucket's smallest and largest value are kept, plus the first and last step.
A single spike among 100,000 steps is therefore always in the answer, where a stride or an average
would drop or flatten it. SQLite picks those steps itself, so the dropped rows never reach Python.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from app.models import STEP_COLUMNS

EVAL_KEY = "eval_loss"
METRIC_KEYS = (*STEP_COLUMNS, EVAL_KEY)
DEFAULT_KEYS = ("loss",)
CSV_COLUMNS = ("step", *STEP_COLUMNS, EVAL_KEY)
_FLOAT_MAX = "1.7976931348623157e308"


class UnknownKeys(ValueError):
    def __init__(self, unknown: Sequence[str]) -> None:
        super().__init__(f"unknown metric keys {', '.join(unknown)}; known keys: {', '.join(METRIC_KEYS)}")
        self.unknown = list(unknown)


def parse_keys(raw: str | None) -> list[str]:
    """'loss,lr' -> ['loss', 'lr'] (duplicates dropped); empty -> the default keys; UnknownKeys otherwise."""
    keys = list(dict.fromkeys(k.strip() for k in (raw or "").split(",") if k.strip()))
    unknown = [k for k in keys if k not in METRIC_KEYS]
    if unknown:
        raise UnknownKeys(unknown)
    return keys or list(DEFAULT_KEYS)


@dataclass
class Metrics:
    """Series aligned on `steps`: `series[key][i]` is the value at `steps[i]` (None where not recorded)."""

    run_id: int
    steps: list[int]
    series: dict[str, list[float | None]]
    downsampled: bool

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "steps": self.steps, "series": self.series, "downsampled": self.downsampled}


def _finite(values: Sequence[Any]) -> list[Any]:
    """JSON has no inf or NaN: non-finite values (a diverged loss) become null."""
    return [v if v is None or isinstance(v, int) or math.isfinite(v) else None for v in values]


# --- reading -----------------------------------------------------------------------------------------


def _step_keys(keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k != EVAL_KEY]  # names from METRIC_KEYS only, never from the request


@dataclass
class _Span:
    n: int
    """Steps with a value of some requested key, counted up to the downsampling limit + 1 only."""
    eval_only: int
    """Eval rows at steps without a step row (an eval before the first step), when step keys are asked too."""


_NO_STEP_ROW = " AND NOT EXISTS (SELECT 1 FROM step_metrics s WHERE s.run_id = e.run_id AND s.step = e.step)"


def _span(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, max_points: int | None) -> _Span:
    # Counting stops at max_points + 1 rows: enough to decide on downsampling, without a full scan.
    limit = -1 if max_points is None else max_points + 1
    n = eval_only = 0
    if _step_keys(keys) and max_points is not None:
        sql = "SELECT count(*) FROM (SELECT 1 FROM step_metrics WHERE run_id = ? AND step > ? LIMIT ?)"
        n = conn.execute(sql, (run_id, since, limit)).fetchone()[0]
    if EVAL_KEY in keys:
        rows = f"SELECT 1 FROM eval_metrics e WHERE run_id = ? AND step > ?{_NO_STEP_ROW if _step_keys(keys) else ''}"
        count = conn.execute(f"SELECT count(*) FROM ({rows} LIMIT ?)", (run_id, since, limit)).fetchone()[0]
        n += count
        eval_only = count if _step_keys(keys) else 0
    return _Span(n, eval_only)


def _bounds(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> tuple[int, int] | None:
    """The first and last step with a value of some requested key (primary-key lookups, no scan)."""
    tables = (["step_metrics"] if _step_keys(keys) else []) + (["eval_metrics"] if EVAL_KEY in keys else [])
    ends: list[int] = []
    for table in tables:
        sql = (
            f"SELECT (SELECT min(step) FROM {table} WHERE run_id = ?1 AND step > ?2), "
            f"(SELECT max(step) FROM {table} WHERE run_id = ?1 AND step > ?2)"
        )
        ends.extend(v for v in conn.execute(sql, (run_id, since)).fetchone() if v is not None)
    return (min(ends), max(ends)) if ends else None


def _load(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> tuple[list[int], dict[str, list]]:
    """Every step after `since` with the requested columns, eval_loss merged in by step."""
    step_keys = _step_keys(keys)
    steps: list[int] = []
    columns: dict[str, list[Any]] = {}
    if step_keys:
        sql = f"SELECT step, {', '.join(step_keys)} FROM step_metrics WHERE run_id = ? AND step > ? ORDER BY step"
        rows = conn.execute(sql, (run_id, since)).fetchall()
        transposed = list(zip(*rows, strict=True)) if rows else [() for _ in range(len(step_keys) + 1)]
        steps = list(transposed[0])
        columns = {k: list(transposed[i]) for i, k in enumerate(step_keys, start=1)}
    if EVAL_KEY in keys:
        sql = "SELECT step, eval_loss FROM eval_metrics WHERE run_id = ? AND step > ? ORDER BY step"
        evals: dict[int, Any] = dict(conn.execute(sql, (run_id, since)).fetchall())
        if not step_keys:
            steps = list(evals)
        elif not evals.keys() <= set(steps):  # evals at steps without a step row: take the union
            merged = sorted(set(steps).union(evals))
            position = {s: i for i, s in enumerate(merged)}
            for k in step_keys:
                filled: list[Any] = [None] * len(merged)
                for s, v in zip(steps, columns[k], strict=True):
                    filled[position[s]] = v
                columns[k] = filled
            steps = merged
        columns[EVAL_KEY] = [evals.get(s) for s in steps]
    return steps, {k: columns[k] for k in keys}


def _extreme_steps(
    conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, max_points: int
) -> list[int]:
    """The first and last step, and for each bucket of steps and each key the steps of its min and max.

    SQLite does the work: each bucket is a primary-key range, and `SELECT step, min(x)` takes `step`
    from the row holding the minimum, so no row reaches Python unless it is kept.
    """
    bounds = _bounds(conn, run_id, keys, since)
    if bounds is None:
        return []
    first, last = bounds
    n_buckets = max(1, (max_points - 2) // (2 * len(keys)))
    width = max(1, math.ceil((last - first + 1) / n_buckets))
    picks = []
    for key in keys:  # from METRIC_KEYS only
        table = "eval_metrics" if key == EVAL_KEY else "step_metrics"
        for extreme in ("min", "max"):
            picks.append(
                f"(SELECT step FROM (SELECT step, {extreme}({key}) FROM {table} "
                "WHERE run_id = :run AND step >= b.lo AND step < b.lo + :width))"
            )
    sql = (
        "WITH RECURSIVE b(lo) AS (SELECT :first UNION ALL SELECT lo + :width FROM b WHERE lo + :width <= :last) "
        f"SELECT {', '.join(picks)} FROM b"
    )
    params = {"run": run_id, "first": first, "last": last, "width": width}
    kept = {first, last}
    for row in conn.execute(sql, params):
        kept.update(step for step in row if step is not None)
    return sorted(kept)


def _values_at(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], steps: list[int]) -> dict[str, list]:
    """The requested keys' values at the given steps (None where there is none)."""
    wanted = json.dumps(steps)
    columns: dict[str, list[Any]] = {}
    step_keys = _step_keys(keys)
    if step_keys:
        sql = (
            f"SELECT step, {', '.join(step_keys)} FROM step_metrics "
            "WHERE run_id = ? AND step IN (SELECT value FROM json_each(?))"
        )
        rows = {row[0]: row for row in conn.execute(sql, (run_id, wanted))}
        missing = (None,) * (len(step_keys) + 1)
        for i, key in enumerate(step_keys, start=1):
            columns[key] = [rows.get(s, missing)[i] for s in steps]
    if EVAL_KEY in keys:
        sql = "SELECT step, eval_loss FROM eval_metrics WHERE run_id = ? AND step IN (SELECT value FROM json_each(?))"
        evals = dict(conn.execute(sql, (run_id, wanted)).fetchall())
        columns[EVAL_KEY] = [evals.get(s) for s in steps]
    return {k: columns[k] for k in keys}


def _budget(max_points: int | None, keys: Sequence[str]) -> int | None:
    """At least the first and last step and one bucket's min and max of each key fit in an answer."""
    return None if max_points is None else max(max_points, 2 + 2 * len(keys))


def _read(
    conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, max_points: int | None, span: _Span
) -> Metrics:
    if max_points is not None and span.n > max_points:
        steps = _extreme_steps(conn, run_id, keys, since, max_points)
        columns = _values_at(conn, run_id, keys, steps)
    else:
        steps, columns = _load(conn, run_id, keys, since)
    downsampled = len(steps) < span.n
    return Metrics(run_id, steps, {k: _finite(v) for k, v in columns.items()}, downsampled)


def read_metrics(
    conn: sqlite3.Connection,
    run_id: int,
    keys: Sequence[str] = DEFAULT_KEYS,
    since_step: int | None = None,
    max_points: int | None = None,
) -> Metrics:
    """A run's series as Python lists (None for missing or non-finite values)."""
    since = -1 if since_step is None else since_step
    budget = _budget(max_points, keys)
    return _read(conn, run_id, keys, since, budget, _span(conn, run_id, keys, since, budget))


def _json_by_sqlite(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> str:
    """The `"steps":..,"series":{..}` members, every point, with the arrays written by SQLite.

    Only when every eval row has a step row (the usual case): evals then join the step rows. The
    arrays come out in step order because the query is a range search of the tables' primary key
    (run_id, step), which SQLite walks in key order (a test inserts rows shuffled to hold it to that).
    An `ORDER BY` inside the aggregates (SQLite >= 3.44) would make SQLite sort every array again:
    2.4 times slower, for nothing.
    """
    step_keys = _step_keys(keys)
    if step_keys:
        source = "step_metrics s" + (
            " LEFT JOIN eval_metrics e ON e.run_id = s.run_id AND e.step = s.step" if EVAL_KEY in keys else ""
        )
        main = "s"
    else:
        source, main = "eval_metrics e", "e"
    arrays = [f"json_group_array({main}.step)"]
    for key in keys:  # from METRIC_KEYS only; inf has no JSON form, so it becomes null like NaN
        ref = f"e.{key}" if key == EVAL_KEY else f"s.{key}"
        arrays.append(f"json_group_array(CASE WHEN abs({ref}) <= {_FLOAT_MAX} THEN {ref} END)")
    sql = f"SELECT {', '.join(arrays)} FROM {source} WHERE {main}.run_id = ? AND {main}.step > ?"
    steps, *series = conn.execute(sql, (run_id, since)).fetchone()
    members = ",".join(f"{json.dumps(k)}:{v}" for k, v in zip(keys, series, strict=True))
    return f'"steps":{steps},"series":{{{members}}},"downsampled":false'


def metrics_members(
    conn: sqlite3.Connection,
    run_id: int,
    keys: Sequence[str],
    since_step: int | None = None,
    max_points: int | None = None,
) -> str:
    """The JSON members `"steps":[..],"series":{..},"downsampled":..` of a run's metrics, built fast."""
    since = -1 if since_step is None else since_step
    budget = _budget(max_points, keys)
    span = _span(conn, run_id, keys, since, budget)
    if (budget is None or span.n <= budget) and not span.eval_only:
        return _json_by_sqlite(conn, run_id, keys, since)
    metrics = _read(conn, run_id, keys, since, budget, span)
    body = json.dumps({"steps": metrics.steps, "series": metrics.series, "downsampled": metrics.downsampled})
    return body[1:-1]


def metrics_json(
    conn: sqlite3.Connection,
    run_id: int,
    keys: Sequence[str],
    since_step: int | None = None,
    max_points: int | None = None,
) -> str:
    """`{"run_id", "steps", "series", "downsampled"}` as JSON text."""
    return f'{{"run_id":{int(run_id)},{metrics_members(conn, run_id, keys, since_step, max_points)}}}'


def compare_json(
    conn: sqlite3.Connection, run_ids: Sequence[int], keys: Sequence[str], max_points: int | None = None
) -> str:
    """`{"keys", "runs": [{id, name, learning_rate, status, sweep_id, steps, series, downsampled}]}`.

    Raises LookupError naming the ids that do not exist.
    """
    marks = ",".join("?" * len(run_ids))
    sql = f"SELECT id, name, learning_rate, status, sweep_id FROM runs WHERE id IN ({marks})"
    meta = {row[0]: row for row in conn.execute(sql, list(run_ids)).fetchall()}
    missing = [i for i in run_ids if i not in meta]
    if missing:
        raise LookupError(f"no runs with ids {', '.join(map(str, missing))}")
    parts = []
    for run_id in run_ids:
        _, name, lr, status, sweep_id = meta[run_id]
        head = json.dumps({"id": run_id, "name": name, "learning_rate": lr, "status": status, "sweep_id": sweep_id})
        parts.append(f"{head[:-1]},{metrics_members(conn, run_id, keys, None, max_points)}}}")
    return f'{{"keys":{json.dumps(list(keys))},"runs":[{",".join(parts)}]}}'


# --- following a run live ------------------------------------------------------------------------------


def new_rows(conn: sqlite3.Connection, run_id: int, after_step: int, limit: int) -> tuple[Metrics, Metrics]:
    """Step rows (all columns) and eval rows recorded after `after_step`, at most `limit` step rows."""
    sql = (
        f"SELECT step, {', '.join(STEP_COLUMNS)} FROM step_metrics WHERE run_id = ? AND step > ? ORDER BY step LIMIT ?"
    )
    rows = conn.execute(sql, (run_id, after_step, limit)).fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(len(STEP_COLUMNS) + 1)]
    steps = Metrics(run_id, list(columns[0]), {k: _finite(columns[i]) for i, k in enumerate(STEP_COLUMNS, 1)}, False)
    # Evals are committed with the step rows of the same flush, so those up to the last step are all here.
    upto = steps.steps[-1] if len(rows) == limit else 2**63 - 1
    sql = "SELECT step, eval_loss FROM eval_metrics WHERE run_id = ? AND step > ? AND step <= ? ORDER BY step"
    evals = conn.execute(sql, (run_id, after_step, upto)).fetchall()
    eval_steps = [r[0] for r in evals]
    return steps, Metrics(run_id, eval_steps, {EVAL_KEY: _finite([r[1] for r in evals])}, False)


# --- CSV -------------------------------------------------------------------------------------------------


def iter_csv(conn: sqlite3.Connection, run_id: int, chunk_rows: int = 5000) -> Iterator[str]:
    """Every recorded step with all metric columns and eval_loss, in step order, a chunk at a time."""
    step_cols = ", ".join(f"s.{c}" for c in STEP_COLUMNS)
    nulls = ", ".join("NULL" for _ in STEP_COLUMNS)
    sql = (
        f"SELECT s.step, {step_cols}, e.eval_loss FROM step_metrics s "
        "LEFT JOIN eval_metrics e ON e.run_id = s.run_id AND e.step = s.step WHERE s.run_id = ? "
        f"UNION ALL SELECT e.step, {nulls}, e.eval_loss FROM eval_metrics e WHERE e.run_id = ? "
        "AND NOT EXISTS (SELECT 1 FROM step_metrics s WHERE s.run_id = e.run_id AND s.step = e.step) "
        "ORDER BY 1"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    cursor = conn.execute(sql, (run_id, run_id))
    while True:
        rows = cursor.fetchmany(chunk_rows)
        if not rows:
            break
        writer.writerows(rows)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()
