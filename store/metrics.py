"""Metric reads: every step of a run, fast, or a downsampled view in which every spike survives.

Reads go through raw sqlite3 cursors with only the requested columns; no ORM objects are built for
metric rows. When every point is wanted, SQLite itself writes the JSON arrays (`json_group_array`),
which is several times faster than turning 20,000 rows into Python floats and encoding them again.

Downsampling is min/max per bucket: for each bucket of consecutive steps and each requested series,
the steps holding the bucket's smallest and largest value are kept, plus the first and last step.
A single spike among 100,000 steps is therefore always in the answer, where a stride or an average
would drop or flatten it. SQLite picks those steps itself, so the dropped rows never reach Python.

Wide buckets are read from rollups instead of the rows: `step_rollups` holds, for each block of 64
steps (and of 2,048), each column's min and max and the step of each, written with the rows (the
recorder writes both through `write_steps`, in one transaction). A bucket of whole blocks then costs a few
rollup rows instead of hundreds of step rows, with the same answer: the same extremes at the same
steps (ties go to the earliest step either way). Where a run's rollups do not match its rows (a
writer that went around `write_steps`), the read scans the rows.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from store import scalars
from store.rollups import ROLLUP_BLOCKS
from store.tables import STEP_COLUMNS

EVAL_KEY = "eval_loss"
METRIC_KEYS = (*STEP_COLUMNS, EVAL_KEY)
DEFAULT_KEYS = ("loss",)
CSV_COLUMNS = ("step", *STEP_COLUMNS, EVAL_KEY)
_FLOAT_MAX = "1.7976931348623157e308"
_BLOCKS_PER_BUCKET = 2
"""A downsampled read is made of whole blocks of a level once each bucket gets this many (buckets of
128 steps or more at level 0); buckets then differ in width by one block at most."""


class UnknownKeys(ValueError):
    def __init__(self, unknown: Sequence[str], custom: Sequence[str] = ()) -> None:
        known = ", ".join((*METRIC_KEYS, *custom))
        super().__init__(f"unknown metric keys {', '.join(unknown)}; known keys: {known}")
        self.unknown = list(unknown)


def parse_keys(raw: str | None, custom: Sequence[str] = ()) -> list[str]:
    """'loss,lr' -> ['loss', 'lr'] (duplicates dropped); empty -> the default keys; UnknownKeys otherwise.

    `custom`: the run's own keys (`store.scalars.scalar_keys`), accepted besides the standard ones.
    """
    keys = list(dict.fromkeys(k.strip() for k in (raw or "").split(",") if k.strip()))
    unknown = [k for k in keys if k not in METRIC_KEYS and k not in custom]
    if unknown:
        raise UnknownKeys(unknown, custom)
    return keys or list(DEFAULT_KEYS)


def _custom(keys: Sequence[str]) -> list[str]:
    """The requested keys that are not standard columns: a run's custom keys (parse_keys checked them)."""
    return [k for k in keys if k not in METRIC_KEYS]


@dataclass
class Metrics:
    """Series aligned on `steps`: `series[key][i]` is the value at `steps[i]` (None where not recorded)."""

    run_id: int
    steps: list[int]
    series: dict[str, list[float | None]]
    downsampled: bool


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


def _table_bounds(conn: sqlite3.Connection, table: str, run_id: int, since: int) -> tuple[int, int] | None:
    """The first and last step after `since` in a metric table (primary-key lookups, no scan)."""
    sql = (
        f"SELECT (SELECT min(step) FROM {table} WHERE run_id = ?1 AND step > ?2), "
        f"(SELECT max(step) FROM {table} WHERE run_id = ?1 AND step > ?2)"
    )
    first, last = conn.execute(sql, (run_id, since)).fetchone()
    return None if first is None else (first, last)


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


@dataclass
class _Grid:
    """`count` buckets of consecutive steps; bucket i starts at step `origin + (i * num // den) * unit`.

    Either `width` steps each (unit 1, num = width, den 1), or whole blocks of a rollup level (unit =
    block size, num = blocks, den = count: the blocks shared out as evenly as whole blocks allow).
    """

    origin: int
    unit: int
    num: int
    den: int
    count: int
    level: int | None
    """The rollup level whose blocks make the buckets; None for buckets of `width` steps."""


def _grid(first: int, last: int, n_buckets: int) -> _Grid:
    """`n_buckets` buckets over first..last (fewer if they would be under a step wide): whole blocks of
    the coarsest rollup level that gives each bucket several, so that they can be read from rollups.

    It depends on the steps only, never on which rollups exist: a scan gives the same answer.
    """
    for level in reversed(range(len(ROLLUP_BLOCKS))):
        size = ROLLUP_BLOCKS[level]
        blocks = last // size - first // size + 1
        if blocks >= _BLOCKS_PER_BUCKET * n_buckets:
            return _Grid(first // size * size, size, blocks, n_buckets, n_buckets, level)
    width = (last - first) // n_buckets + 1
    return _Grid(first, 1, width, 1, (last - first) // width + 1, None)


def _rollups_match(
    conn: sqlite3.Connection, run_id: int, level: int, origin: int, since: int, rows: tuple[int, int]
) -> bool:
    """Whether the level's rollup blocks from `origin` on sum up exactly the step rows after `since`,
    the first and last of which are at steps `rows`.

    `write_steps` keeps the blocks of the rows it writes, so checking the ends is enough: the first and
    last row are where their blocks say, and no row at or before `since` shares a block read.
    """
    size = ROLLUP_BLOCKS[level]
    first, last = rows
    sql = (
        "SELECT (SELECT first_step FROM step_rollups WHERE run_id = ?1 AND level = ?2 AND block = ?3), "
        "(SELECT last_step FROM step_rollups WHERE run_id = ?1 AND level = ?2 AND block = ?4), "
        "(SELECT max(step) FROM step_metrics WHERE run_id = ?1 AND step >= ?5 AND step <= ?6)"
    )
    starts, ends, cut = conn.execute(sql, (run_id, level, first // size, last // size, origin, since)).fetchone()
    return starts == first and ends == last and cut is None


def _extreme_steps(
    conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, max_points: int
) -> list[int]:
    """The first and last step, and for each bucket of steps and each key the steps of its min and max.

    SQLite does the work, one bucket at a time, in step order: a bucket is a primary-key range of the
    rows, or of the rollup blocks when it is made of whole blocks (a block's min and the step holding
    it stand for its rows), and `SELECT step, min(x)` takes `step` from the first row holding the min.
    """
    rows = _table_bounds(conn, "step_metrics", run_id, since) if _step_keys(keys) else None
    evals = _table_bounds(conn, "eval_metrics", run_id, since) if EVAL_KEY in keys else None
    ends = [*(rows or ()), *(evals or ())]
    if not ends:
        return []
    first, last = min(ends), max(ends)
    grid = _grid(first, last, max(1, (max_points - 2) // (2 * len(keys))))
    level = grid.level
    if level is not None and (rows is None or not _rollups_match(conn, run_id, level, grid.origin, since, rows)):
        level = None
    picks = []
    for key in keys:  # from METRIC_KEYS only
        for extreme in ("min", "max"):
            if key != EVAL_KEY and level is not None:
                picks.append(
                    f"(SELECT {key}_{extreme}_step FROM (SELECT {key}_{extreme}_step, {extreme}({key}_{extreme}) "
                    "FROM step_rollups WHERE run_id = :run AND level = :level "
                    "AND block >= b.lo / :unit AND block < b.hi / :unit))"
                )
            else:  # a bucket without a value of the key keeps no step for it
                table = "eval_metrics" if key == EVAL_KEY else "step_metrics"
                picks.append(
                    f"(SELECT CASE WHEN v IS NOT NULL THEN step END FROM (SELECT step, {extreme}({key}) AS v "
                    f"FROM {table} WHERE run_id = :run AND step >= max(b.lo, :since + 1) AND step < b.hi))"
                )
    start = ":origin + (b.i * :num / :den) * :unit"  # integer division: the grid's bucket bounds
    sql = (
        f"WITH RECURSIVE b(i, lo, hi) AS (SELECT 0, :origin, {start.replace('b.i', '1')} "
        f"UNION ALL SELECT b.i + 1, b.hi, {start.replace('b.i', '(b.i + 2)')} FROM b WHERE b.i + 1 < :count) "
        f"SELECT {', '.join(picks)} FROM b"
    )
    params = vars(grid) | {"run": run_id, "since": since, "level": level}
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


def _json_at(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], steps: list[int]) -> tuple[str, list[str]]:
    """The steps array and each key's array of values at those steps (null where none), written by SQLite.

    `json_each` drives the join, so the arrays follow the given (sorted) steps; each step costs one
    primary-key lookup per table.
    """
    joins = ""
    if _step_keys(keys):
        joins += " LEFT JOIN step_metrics s ON s.run_id = :run AND s.step = j.value"
    if EVAL_KEY in keys:
        joins += " LEFT JOIN eval_metrics e ON e.run_id = :run AND e.step = j.value"
    arrays = ["json_group_array(j.value)"]
    for key in keys:  # from METRIC_KEYS only
        ref = f"e.{key}" if key == EVAL_KEY else f"s.{key}"
        arrays.append(f"json_group_array(CASE WHEN abs({ref}) <= {_FLOAT_MAX} THEN {ref} END)")
    sql = f"SELECT {', '.join(arrays)} FROM json_each(:steps) j{joins}"
    steps_json, *series = conn.execute(sql, {"run": run_id, "steps": json.dumps(steps)}).fetchone()
    return steps_json, series


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
    if _custom(keys):
        return _read_mixed(conn, run_id, keys, since, budget)
    return _read(conn, run_id, keys, since, budget, _span(conn, run_id, keys, since, budget))


def _read_mixed(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, budget: int | None) -> Metrics:
    """Standard and custom keys together, on the union of their steps; downsampled by the same min/max rule,
    the budget shared between the two kinds by their number of keys."""
    custom = _custom(keys)
    standard = [k for k in keys if k not in custom]
    n = 0
    if budget is not None:
        n = max(_span(conn, run_id, standard, since, budget).n if standard else 0,
                scalars.count_after(conn, run_id, custom, since, budget + 1))  # fmt: skip
    columns: dict[str, list[Any]] = {}
    if budget is not None and n > budget:
        share = budget * len(standard) // len(keys)
        kept = set(_extreme_steps(conn, run_id, standard, since, max(share, 2 + 2 * len(standard))) if standard else ())
        ends = scalars.bounds(conn, run_id, custom, since)
        if ends is not None:
            buckets = max(1, (budget - share - 2) // (2 * len(custom)))
            kept |= {*ends, *scalars.extreme_steps(conn, run_id, custom, since, *ends, buckets)}
        steps = sorted(kept)
        columns = _values_at(conn, run_id, standard, steps) if standard else {}
        custom_series = {k: scalars.series(conn, run_id, k, since, steps) for k in custom}
    else:
        step_rows, loaded = _load(conn, run_id, standard, since) if standard else ([], {})
        custom_series = {k: scalars.series(conn, run_id, k, since) for k in custom}
        steps = sorted(set(step_rows).union(*custom_series.values()))
        if steps != step_rows:
            position = {step: i for i, step in enumerate(step_rows)}
            loaded = {k: [v[position[s]] if s in position else None for s in steps] for k, v in loaded.items()}
        columns = loaded
    for key, values in custom_series.items():
        columns[key] = [values.get(s) for s in steps]
    series = {k: _finite(columns[k]) for k in keys}
    return Metrics(run_id, steps, series, budget is not None and len(steps) < n)


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
    if _custom(keys):  # custom keys: read into Python (their series are usually short)
        metrics = _read_mixed(conn, run_id, keys, since, budget)
        body = json.dumps({"steps": metrics.steps, "series": metrics.series, "downsampled": metrics.downsampled})
        return body[1:-1]
    span = _span(conn, run_id, keys, since, budget)
    if budget is None or span.n <= budget:
        if not span.eval_only:
            return _json_by_sqlite(conn, run_id, keys, since)
        metrics = _read(conn, run_id, keys, since, budget, span)
        body = json.dumps({"steps": metrics.steps, "series": metrics.series, "downsampled": metrics.downsampled})
        return body[1:-1]
    steps = _extreme_steps(conn, run_id, keys, since, budget)
    steps_json, series = _json_at(conn, run_id, keys, steps)
    members = ",".join(f"{json.dumps(k)}:{v}" for k, v in zip(keys, series, strict=True))
    return f'"steps":{steps_json},"series":{{{members}}},"downsampled":{json.dumps(len(steps) < span.n)}'


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
    members = _members_of_runs(conn, run_ids, keys, max_points)
    parts = []
    for run_id, body in zip(run_ids, members, strict=True):
        _, name, lr, status, sweep_id = meta[run_id]
        head = json.dumps({"id": run_id, "name": name, "learning_rate": lr, "status": status, "sweep_id": sweep_id})
        parts.append(f"{head[:-1]},{body}}}")
    return f'{{"keys":{json.dumps(list(keys))},"runs":[{",".join(parts)}]}}'


READ_THREADS = 2


def _members_of_runs(
    conn: sqlite3.Connection, run_ids: Sequence[int], keys: Sequence[str], max_points: int | None
) -> list[str]:
    """Each run's metric members; full-resolution reads of several runs go on READ_THREADS connections.

    Writing every point as JSON is SQLite's float formatting, in C with the GIL released, so a second
    connection on the other core halves the time of a many-run read (179 -> ~100 ms for 10 x 20,000 x 4).
    Downsampled reads are short enough that opening connections would cost more than it saves.
    """
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if max_points is not None or len(run_ids) < 2 or not path:
        return [metrics_members(conn, run_id, keys, None, max_points) for run_id in run_ids]

    def read(share: Sequence[int]) -> list[str]:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as own:
            return [metrics_members(own, run_id, keys, None, None) for run_id in share]

    shares = [run_ids[i::READ_THREADS] for i in range(READ_THREADS)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        results = list(pool.map(read, shares))
    by_id = {
        run_id: body
        for share, bodies in zip(shares, results, strict=True)
        for run_id, body in zip(share, bodies, strict=True)
    }
    return [by_id[run_id] for run_id in run_ids]


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
    """Every recorded step with all metric columns and eval_loss, in step order, a chunk at a time; then a
    column per custom key of the run (`store.scalars`), empty where a step has no value of it."""
    custom = scalars.scalar_keys(conn, run_id)
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
    writer.writerow((*CSV_COLUMNS, *custom))
    cursor = conn.execute(sql, (run_id, run_id))
    while True:
        rows = cursor.fetchmany(chunk_rows)
        if not rows:
            break
        if custom:
            rows = _with_custom(conn, run_id, custom, rows)
        writer.writerows(rows)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _with_custom(conn: sqlite3.Connection, run_id: int, custom: Sequence[str], rows: list[Any]) -> list[Any]:
    """CSV rows (sorted by step) with each custom key's value at their step appended."""
    first, last = rows[0][0], rows[-1][0]
    sql = "SELECT step, value FROM scalar_metrics WHERE run_id = ? AND key = ? AND step BETWEEN ? AND ?"
    values = [dict(conn.execute(sql, (run_id, key, first, last)).fetchall()) for key in custom]
    return [(*row, *(v.get(row[0]) for v in values)) for row in rows]
