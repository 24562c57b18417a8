"""Metric reads: every step of a run, fast, or a downsampled view in which every spike survives.

Reads go through raw sqlite3 cursors with only the requested columns; no ORM objects are built for
metric rows. When every point is wanted, SQLite itself writes the JSON arrays (`json_group_array`),
which is several times faster than turning 20,000 rows into Python floats and encoding them again.

Downsampling is min/max per bucket ("M4" without first/last): for each bucket of consecutive steps
and each requested series, the steps holding the bucket's smallest and largest value are kept, plus
the run's first and last step. A single spike among 100,000 steps is therefore always in the answer,
where a stride or an average would drop or flatten it.
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

import numpy as np

from app.models import STEP_COLUMNS

EVAL_KEY = "eval_loss"
METRIC_KEYS = (*STEP_COLUMNS, EVAL_KEY)
DEFAULT_KEYS = ("loss",)
CSV_COLUMNS = ("step", *STEP_COLUMNS, EVAL_KEY)
# SQLite >= 3.44 can order an aggregate's input; before that, the primary-key scan gives step order.
_IN_STEP_ORDER = " ORDER BY step" if sqlite3.sqlite_version_info >= (3, 44, 0) else ""
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


def _load(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> tuple[list[int], dict[str, list]]:
    """Steps after `since` and the requested columns, eval_loss merged in by step."""
    step_keys = [k for k in keys if k != EVAL_KEY]  # names from METRIC_KEYS only, never from the request
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
        elif not evals.keys() <= set(steps):  # evals at steps without a step row (rare): take the union
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


def extreme_indices(columns: Sequence[Sequence[float | None]], max_points: int) -> list[int]:
    """Indices to keep so that each column's min and max of every bucket survive (first and last too).

    The buckets are sized so that the answer holds at most `max_points` indices (at least one bucket).
    """
    n = len(columns[0]) if columns else 0
    if n <= max_points:
        return list(range(n))
    n_buckets = max(1, (max_points - 2) // (2 * len(columns)))
    width = math.ceil(n / n_buckets)
    n_buckets = math.ceil(n / width)
    starts = np.arange(n_buckets) * width
    keep = [np.array([0, n - 1])]
    for column in columns:
        values = np.full(n_buckets * width, np.nan)
        values[:n] = np.array(column, dtype=float)  # None -> nan
        grid = values.reshape(n_buckets, width)
        missing = np.isnan(grid)
        has_values = ~missing.all(axis=1)
        low = np.where(missing, np.inf, grid).argmin(axis=1)
        high = np.where(missing, -np.inf, grid).argmax(axis=1)
        keep.append((starts + low)[has_values])
        keep.append((starts + high)[has_values])
    return [int(i) for i in np.unique(np.concatenate(keep))]


def read_metrics(
    conn: sqlite3.Connection,
    run_id: int,
    keys: Sequence[str] = DEFAULT_KEYS,
    since_step: int | None = None,
    max_points: int | None = None,
) -> Metrics:
    """A run's series as Python lists (None for missing or non-finite values)."""
    steps, columns = _load(conn, run_id, keys, -1 if since_step is None else since_step)
    downsampled = max_points is not None and len(steps) > max_points
    if max_points is not None and downsampled:
        keep = extreme_indices(list(columns.values()), max_points)
        steps = [steps[i] for i in keep]
        columns = {k: [v[i] for i in keep] for k, v in columns.items()}
    return Metrics(run_id, steps, {k: _finite(v) for k, v in columns.items()}, downsampled)


def _count(conn: sqlite3.Connection, run_id: int, since: int) -> int:
    sql = "SELECT count(*) FROM step_metrics WHERE run_id = ? AND step > ?"
    count: int = conn.execute(sql, (run_id, since)).fetchone()[0]
    return count


def _json_by_sqlite(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> str:
    """The `"steps":..,"series":{..}` members, every point, with the arrays written by SQLite."""
    arrays = [f"json_group_array(step{_IN_STEP_ORDER})"]
    for key in keys:  # from METRIC_KEYS only; inf has no JSON form, so it becomes null like NaN
        arrays.append(f"json_group_array(CASE WHEN abs({key}) <= {_FLOAT_MAX} THEN {key} END{_IN_STEP_ORDER})")
    sql = f"SELECT {', '.join(arrays)} FROM step_metrics WHERE run_id = ? AND step > ?"
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
    if EVAL_KEY not in keys and (max_points is None or _count(conn, run_id, since) <= max_points):
        return _json_by_sqlite(conn, run_id, keys, since)
    metrics = read_metrics(conn, run_id, keys, since_step, max_points)
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
