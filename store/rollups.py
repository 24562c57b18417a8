"""Writing step rows with their rollups: each block of 64 (and 2,048) consecutive steps of a run summed
up as each column's min and max and the step of each, so that a downsampled read (store.metrics) of a
long run reads a few rollup rows instead of every step row.

`write_steps` writes rows and their blocks' rollups in the caller's transaction (the recorder's writer
thread calls it), so a reader never sees rows without their rollups.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from store.tables import ROLLUP_PARTS, STEP_COLUMNS

ROLLUP_BLOCKS = (64, 2048)
"""Steps per rollup block at level 0 and level 1 (32 level-0 blocks); changing them needs a migration.
Fewer, larger blocks cost the writer less (each rollup row is as wide as 4 step rows)."""

STEP_INSERT = (
    f"INSERT OR REPLACE INTO step_metrics (run_id, step, {', '.join(STEP_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(STEP_COLUMNS) + 2))})"
)
_ROLLUP_COLUMNS = ("first_step", "last_step", *(f"{c}_{part}" for c in STEP_COLUMNS for part in ROLLUP_PARTS))
_ROLLUP_INSERT = (
    f"INSERT OR REPLACE INTO step_rollups (run_id, level, block, {', '.join(_ROLLUP_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(_ROLLUP_COLUMNS) + 3))})"
)
_ROWS_SQL = f"SELECT step, {', '.join(STEP_COLUMNS)} FROM step_metrics WHERE run_id = ? AND step BETWEEN ? AND ?"
_BLOCKS_SQL = (
    f"SELECT block, {', '.join(_ROLLUP_COLUMNS)} FROM step_rollups "
    "WHERE run_id = ? AND level = ? AND block BETWEEN ? AND ?"
)
_REFRESH_CHUNK = 64 * ROLLUP_BLOCKS[-1]
"""Steps a whole-run refresh reads at a time (whole top-level blocks)."""


def write_steps(conn: sqlite3.Connection, run_id: int, rows: Sequence[Sequence[Any]]) -> None:
    """Write step rows (run_id, step, *STEP_COLUMNS) of one run, replacing any of the same steps, and
    bring the rollups of their blocks up to date, in the caller's transaction.

    Writers of step_metrics go through here (the recorder's writer thread does): a run whose rollups
    do not match its rows is read by scanning them, which is correct but slow.
    """
    if not rows:
        return
    width = len(STEP_COLUMNS) + 2
    flat = list(chain.from_iterable(rows))
    _insert_rows(conn, STEP_INSERT, flat, width)
    try:  # a fifth faster than np.array, where no value is None
        table = np.fromiter(flat, np.float64, len(flat)).reshape(-1, width)[:, 1:]
    except TypeError:
        table = np.array(flat, dtype=np.float64).reshape(-1, width)[:, 1:]
    steps = table[:, 0]
    if (steps[1:] > steps[:-1]).all():
        _refresh_rows(conn, run_id, table, complete=False)
    else:  # out of order or a step twice: the stored rows say which value won
        _refresh_range(conn, run_id, int(steps.min()), int(steps.max()))


def _insert_rows(conn: sqlite3.Connection, sql: str, flat: list[Any], width: int) -> None:
    """Run `sql`, an INSERT of one row of `width` values, for the rows laid one after another in `flat`.

    Up to 999 values to a statement (SQLite's oldest limit): every run of a statement lets go of the GIL
    and takes it back, and a statement per row writes a third fewer rows per second.
    """
    per_statement = max(1, 999 // width)
    rows = len(flat) // width
    whole = (rows - rows % per_statement) * width
    size = per_statement * width
    if whole:
        conn.executemany(_many_rows(sql, width, per_statement), [flat[i : i + size] for i in range(0, whole, size)])
    conn.executemany(sql, [flat[i : i + width] for i in range(whole, len(flat), width)])


@functools.cache
def _many_rows(sql: str, width: int, rows: int) -> str:
    return sql + f", ({', '.join('?' * width)})" * (rows - 1)


@dataclass
class _Members:
    """What a level's blocks are summed up from, in step order: rows (a step each) or blocks of the level below.

    `low[i, c]` is member i's smallest value of column c (NaN: none) and `low_step[i, c]` the first step
    holding it; `high` and `high_step` the same for the largest.
    """

    block: np.ndarray
    """The block, of the level being summed up, that each member falls in."""
    first: np.ndarray
    last: np.ndarray
    low: np.ndarray
    low_step: np.ndarray
    high: np.ndarray
    high_step: np.ndarray

    @classmethod
    def of_rows(cls, table: np.ndarray) -> _Members:
        """From rows (step, *STEP_COLUMNS) as floats (NaN for NULL), sorted by step, no step twice."""
        steps, values = table[:, 0], table[:, 1:]
        at = np.broadcast_to(steps[:, None], values.shape)
        return cls(steps // ROLLUP_BLOCKS[0], steps, steps, values, at, values, at)

    @classmethod
    def of_blocks(cls, table: np.ndarray) -> _Members:
        """From level-0 rollups (block, *_ROLLUP_COLUMNS) as floats, sorted by block."""
        per_block = ROLLUP_BLOCKS[1] // ROLLUP_BLOCKS[0]
        return cls(table[:, 0] // per_block, table[:, 1], table[:, 2], *(table[:, 3 + i :: 4] for i in range(4)))

    def slice(self, lo: int, hi: int) -> _Members:
        return _Members(*(getattr(self, f)[lo:hi] for f in self.__dataclass_fields__))


def _groups(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal values of a sorted array starts, and its length."""
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return starts, np.diff(np.r_[starts, len(ids)])


def _sum_up(run_id: int, level: int, m: _Members) -> np.ndarray:
    """One rollup row per block, as `_ROLLUP_INSERT` takes it (run_id, level, block, first_step, ...).

    A block's min is the smallest value of its members, held at the earliest step that has it (the
    first member, in step order, whose min equals it); NaN, which stands for NULL, where no member
    has a value. The same rule as SQLite's `min(x)` with a bare `step` column over the rows.
    """
    n, width = m.low.shape
    starts, counts = _groups(m.block)
    out = np.empty((len(starts), 5 + 4 * width))
    out[:, 0], out[:, 1] = run_id, level
    out[:, 2], out[:, 3], out[:, 4] = m.block[starts], m.first[starts], m.last[starts + counts - 1]
    # Blocks of one size without NULLs (the usual whole blocks): argmin/argmax, which take the first.
    plain = bool((counts == counts[0]).all()) and not (np.isnan(m.low).any() or np.isnan(m.high).any())
    for i, (values, steps, best, arg) in enumerate(
        ((m.low, m.low_step, np.fmin, np.argmin), (m.high, m.high_step, np.fmax, np.argmax))
    ):
        if plain:
            values, steps = values.reshape(-1, counts[0], width), steps.reshape(-1, counts[0], width)
            holder = arg(values, axis=1)[:, None, :]
            extreme = np.take_along_axis(values, holder, axis=1)[:, 0, :]
            at = np.take_along_axis(steps, holder, axis=1)[:, 0, :]
        else:
            extreme = best.reduceat(values, starts, axis=0)  # fmin/fmax skip NaN: NaN only if all are
            hit = np.where(values == np.repeat(extreme, counts, axis=0), np.arange(n)[:, None], n)
            holder = np.minimum.reduceat(hit, starts, axis=0)  # the first member holding it
            at = np.where(holder < n, steps[np.minimum(holder, n - 1), np.arange(width)], np.nan)
        out[:, 5 + 2 * i :: 4] = extreme
        out[:, 6 + 2 * i :: 4] = at
    return out


def _as_table(rows: list[Any]) -> np.ndarray:
    """sqlite3 rows (at least one) as floats, NaN for None (SQLite's NULL)."""
    return np.array(rows, dtype=np.float64)


def _stored(conn: sqlite3.Connection, run_id: int, level: int, block: int) -> _Members:
    """The stored members of a block: its step rows (level 0) or its level-0 rollups (level 1)."""
    if level == 0:
        size = ROLLUP_BLOCKS[0]
        return _Members.of_rows(
            _as_table(conn.execute(_ROWS_SQL, (run_id, block * size, (block + 1) * size - 1)).fetchall())
        )
    per_block = ROLLUP_BLOCKS[1] // ROLLUP_BLOCKS[0]
    stored = conn.execute(_BLOCKS_SQL, (run_id, 0, block * per_block, (block + 1) * per_block - 1)).fetchall()
    return _Members.of_blocks(_as_table(stored))


def _refresh_level(conn: sqlite3.Connection, run_id: int, level: int, members: _Members, complete: bool) -> np.ndarray:
    """Store the level's rollups of the blocks the members fall in, and return them (sorted by block).

    Unless `complete` (the members are all there is of their blocks), a block with fewer members than
    it has room for is summed up from what is stored instead (written just before, in this transaction).
    """
    room = ROLLUP_BLOCKS[0] if level == 0 else ROLLUP_BLOCKS[1] // ROLLUP_BLOCKS[0]
    starts, counts = _groups(members.block)
    partial = [] if complete else np.flatnonzero(counts < room).tolist()  # usually the first and the last
    # Leave partial blocks at the ends out of the sum (the rest are then often all whole: a faster sum).
    lo = 1 if partial and partial[0] == 0 else 0
    hi = len(starts) - 1 if partial and partial[-1] == len(starts) - 1 else len(starts)
    bounds = np.r_[starts, len(members.block)]
    parts = [_sum_up(run_id, level, members.slice(bounds[lo], bounds[hi]))] if lo < hi else []
    parts += [_sum_up(run_id, level, _stored(conn, run_id, level, int(members.block[starts[i]]))) for i in partial]
    rollups = np.concatenate(parts)
    if len(parts) > 1:  # by block, a block summed up from what is stored replacing one from the members
        rollups = rollups[np.argsort(rollups[:, 2], kind="stable")]
        rollups = rollups[np.r_[rollups[1:, 2] != rollups[:-1, 2], True]]
    # Floats throughout: SQLite stores NaN as NULL, and the INTEGER columns turn 17.0 back into 17.
    _insert_rows(conn, _ROLLUP_INSERT, rollups.ravel().tolist(), rollups.shape[1])
    return rollups


def _refresh_rows(conn: sqlite3.Connection, run_id: int, table: np.ndarray, complete: bool) -> None:
    """Both levels' rollups of the blocks holding rows (step, *STEP_COLUMNS) sorted by step, no step twice."""
    level0 = _refresh_level(conn, run_id, 0, _Members.of_rows(table), complete)
    _refresh_level(conn, run_id, 1, _Members.of_blocks(level0[:, 2:]), complete)


def refresh_rollups(conn: sqlite3.Connection, run_id: int) -> None:
    """Redo all the rollups of a run from its step rows (after rows were written other than by `write_steps`)."""
    conn.execute("DELETE FROM step_rollups WHERE run_id = ?", (run_id,))
    sql = "SELECT min(step), max(step) FROM step_metrics WHERE run_id = ?"
    _refresh_range(conn, run_id, *conn.execute(sql, (run_id,)).fetchone())


def _refresh_range(conn: sqlite3.Connection, run_id: int, first: int | None, last: int | None) -> None:
    """Redo every block holding steps first..last, reading the rows a few level-1 blocks at a time."""
    if first is None or last is None:
        return
    for lo in range(first - first % ROLLUP_BLOCKS[1], last + 1, _REFRESH_CHUNK):
        rows = conn.execute(_ROWS_SQL, (run_id, lo, lo + _REFRESH_CHUNK - 1)).fetchall()
        if rows:
            _refresh_rows(conn, run_id, _as_table(rows), complete=True)
