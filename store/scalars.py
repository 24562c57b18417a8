"""Scalars beyond the standard step columns (accuracy, reward, a custom norm): written, listed and read by key.

They live in the narrow `scalar_metrics` table (run_id, key, step, value), so a script can log any name
without a migration, while the standard columns keep the fast wide `step_metrics` table and its rollups.
Key names come from requests: they are only ever bound as SQL parameters, never put into SQL text.

Downsampling is the same min/max-per-bucket rule as `store.metrics` (every spike survives), done by
SQLite with one `GROUP BY` per key and extreme: a bare `step` next to `min(value)` is taken from the row
holding the min. These series are usually sparser than the standard ones, so no rollups are kept.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence

KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_./:-]{0,99}")
"""A custom key: a name up to 100 characters (letters, digits, `_ . / : -`), e.g. `eval/accuracy`."""

_INSERT = "INSERT OR REPLACE INTO scalar_metrics (run_id, key, step, value) VALUES (?, ?, ?, ?)"
SCALAR_INSERT = _INSERT  # for writers that queue their SQL (trainer.recorder)
# Distinct keys of a run by walking the primary key: one seek per key, whatever the number of rows.
_KEYS_SQL = (
    "WITH RECURSIVE k(key) AS (SELECT min(key) FROM scalar_metrics WHERE run_id = :run "
    "UNION ALL SELECT (SELECT min(key) FROM scalar_metrics WHERE run_id = :run AND key > k.key) "
    "FROM k WHERE k.key IS NOT NULL) SELECT key FROM k WHERE key IS NOT NULL"
)


def write_scalars(conn: sqlite3.Connection, run_id: int, rows: Iterable[tuple[str, int, float | None]]) -> None:
    """(key, step, value) rows of one run, replacing those of the same key and step, in the caller's transaction."""
    conn.executemany(_INSERT, ((run_id, key, step, value) for key, step, value in rows))


def scalar_keys(conn: sqlite3.Connection, run_id: int) -> list[str]:
    """The custom keys a run has recorded, sorted."""
    return [row[0] for row in conn.execute(_KEYS_SQL, {"run": run_id})]


def delete_scalars(conn: sqlite3.Connection, run_id: int) -> None:
    conn.execute("DELETE FROM scalar_metrics WHERE run_id = ?", (run_id,))


def count_after(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, limit: int) -> int:
    """Distinct steps after `since` with a value of any of `keys`, counted up to `limit` (-1: all)."""
    marks = ",".join("?" * len(keys))
    sql = (
        "SELECT count(*) FROM (SELECT DISTINCT step FROM scalar_metrics "
        f"WHERE run_id = ? AND key IN ({marks}) AND step > ? LIMIT ?)"
    )
    return int(conn.execute(sql, (run_id, *keys, since, limit)).fetchone()[0])


def bounds(conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int) -> tuple[int, int] | None:
    """The first and last step after `since` with a value of any of `keys`."""
    ends = []
    for key in keys:
        sql = "SELECT min(step), max(step) FROM scalar_metrics WHERE run_id = ? AND key = ? AND step > ?"
        first, last = conn.execute(sql, (run_id, key, since)).fetchone()
        if first is not None:
            ends += [first, last]
    return (min(ends), max(ends)) if ends else None


def series(
    conn: sqlite3.Connection, run_id: int, key: str, since: int, steps: Sequence[int] | None = None
) -> dict[int, float | None]:
    """step -> value of one key after `since` (only at `steps`, when given)."""
    sql = "SELECT step, value FROM scalar_metrics WHERE run_id = ? AND key = ? AND step > ?"
    values = dict(conn.execute(sql, (run_id, key, since)).fetchall())
    return values if steps is None else {s: values[s] for s in steps if s in values}


def extreme_steps(
    conn: sqlite3.Connection, run_id: int, keys: Sequence[str], since: int, first: int, last: int, n_buckets: int
) -> set[int]:
    """For buckets of equal width over first..last, the steps of each key's min and max in each bucket."""
    width = (last - first) // max(1, n_buckets) + 1
    kept: set[int] = set()
    for key in keys:
        for extreme in ("min", "max"):  # a fixed word, not input
            sql = (
                f"SELECT step, {extreme}(value) FROM scalar_metrics WHERE run_id = ? AND key = ? AND step > ? "
                "AND value IS NOT NULL GROUP BY (step - ?) / ?"
            )
            kept.update(row[0] for row in conn.execute(sql, (run_id, key, since, first, width)))
    return kept
