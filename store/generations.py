"""What runs answered to their fixed held-out prompts at eval steps (`generations`), written and read.

The trainer writes them through `trainer.recorder` (or the ingest API); the pages and the API read one
run's answers by step, or every run's answers at the same steps for the compare view.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

GENERATION_INSERT = (
    "INSERT OR REPLACE INTO generations (run_id, step, prompt_index, prompt, expected, output, exact, overlap) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
GenerationRow = tuple[int, int, str, str | None, str, bool | None, float | None]
"""(step, prompt_index, prompt, expected, output, exact, overlap)."""


def write_generations(conn: sqlite3.Connection, run_id: int, rows: Iterable[GenerationRow]) -> None:
    """Rows of one run, replacing those of the same step and prompt (a resumed run answers again)."""
    conn.executemany(GENERATION_INSERT, ((run_id, *row) for row in rows))


def read_generations(conn: sqlite3.Connection, run_id: int) -> dict[str, Any]:
    """A run's prompts (with the expected answers) and, per eval step, its answer to each, oldest step first."""
    sql = (
        "SELECT step, prompt_index, prompt, expected, output, exact, overlap FROM generations "
        "WHERE run_id = ? ORDER BY step, prompt_index"
    )
    prompts: dict[int, dict[str, Any]] = {}
    steps: dict[int, list[dict[str, Any]]] = {}
    for step, index, prompt, expected, output, exact, overlap in conn.execute(sql, (run_id,)):
        prompts[index] = {"index": index, "prompt": prompt, "expected": expected}
        answer = {"index": index, "output": output, "exact": None if exact is None else bool(exact), "overlap": overlap}
        steps.setdefault(step, []).append(answer)
    return {
        "prompts": [prompts[i] for i in sorted(prompts)],
        "steps": [{"step": step, "answers": answers} for step, answers in steps.items()],
    }
