"""The recorded walk of a run: probe curves along its steps, per-tensor norms, and loss maps of runs' paths.

Written by the recorder's thread (trainer.recorder) or the ingest API, read by the API and the map job.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

ProbeRow = tuple[int, list[float], list[float | None], float | None]  # step, alphas, losses, best alpha
ModuleRow = tuple[int, list[float | None], list[float | None]]  # step, update norms, weight norms

PROBE_INSERT = "INSERT OR REPLACE INTO probe_curves (run_id, step, alphas, losses, best_alpha) VALUES (?, ?, ?, ?, ?)"
MODULE_INSERT = "INSERT OR REPLACE INTO module_norms (run_id, step, update_norms, param_norms) VALUES (?, ?, ?, ?)"
SNAPSHOTS_FILE = "snapshots.pt"
"""In a run's folder: its LoRA weight snapshots for the map (trainer.landscape.Snapshots)."""

_TENSOR = re.compile(r"(?:layers|h|blocks)\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)\.lora_([AB])$")


def probe_values(run_id: int, rows: list[ProbeRow]) -> list[tuple[Any, ...]]:
    """PROBE_INSERT's parameters for these rows."""
    return [(run_id, s, json.dumps(a), json.dumps(v), b) for s, a, v, b in rows]


def module_values(run_id: int, rows: list[ModuleRow]) -> list[tuple[Any, ...]]:
    """MODULE_INSERT's parameters for these rows."""
    return [(run_id, s, json.dumps(u), json.dumps(p)) for s, u, p in rows]


def read_probes(conn: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
    sql = "SELECT step, alphas, losses, best_alpha FROM probe_curves WHERE run_id = ? ORDER BY step"
    return [
        {"step": step, "alphas": json.loads(alphas), "losses": json.loads(losses), "best_alpha": best}
        for step, alphas, losses, best in conn.execute(sql, (run_id,))
    ]


def split_name(name: str) -> tuple[int | None, str, str]:
    """(layer, module, A or B) of a LoRA tensor's short name, e.g. `layers.3.self_attn.q_proj.lora_A` ->
    (3, "q_proj", "A"); a name of another shape keeps its whole self as the module."""
    found = _TENSOR.search(name)
    if found is None:
        return None, name, ""
    return int(found.group(1)), found.group(2), found.group(3)


def read_module_norms(conn: sqlite3.Connection, run_id: int) -> dict[str, Any]:
    """The tensors' names (split into layer, module and A/B) and, per recorded step, their norms."""
    names_json = conn.execute("SELECT lora_tensors FROM runs WHERE id = ?", (run_id,)).fetchone()
    # JSON null until the run's job has loaded its model (SQLAlchemy stores None in a JSON column as 'null')
    names: list[str] = (json.loads(names_json[0]) if names_json and names_json[0] else None) or []
    steps, updates, params = [], [], []
    sql = "SELECT step, update_norms, param_norms FROM module_norms WHERE run_id = ? ORDER BY step"
    for step, u, p in conn.execute(sql, (run_id,)):
        steps.append(step)
        updates.append(json.loads(u))
        params.append(json.loads(p))
    parts = [split_name(n) for n in names]
    return {
        "tensors": names,
        "layers": [p[0] for p in parts],
        "modules": [p[1] for p in parts],
        "matrices": [p[2] for p in parts],
        "steps": steps,
        "update_norms": updates,
        "param_norms": params,
        "update_ratios": [
            [un / pn if un is not None and pn else None for un, pn in zip(u, p, strict=True)]
            for u, p in zip(updates, params, strict=True)
        ],
    }


def map_runs(run_ids: list[int]) -> str:
    """The part of a map's key that names its runs (in any order): `runs=1,2,3;`."""
    return f"runs={','.join(str(r) for r in sorted(set(run_ids)))};"


def map_key(run_ids: list[int], resolution: int) -> str:
    """What a map is made of: asking for the same runs at the same resolution finds the stored one."""
    return f"{map_runs(run_ids)}resolution={resolution}"


def update_map(conn: sqlite3.Connection, map_id: int, **fields: Any) -> None:
    names = sorted(fields)
    values = [json.dumps(fields[n]) if isinstance(fields[n], dict | list) else fields[n] for n in names]
    with conn:
        conn.execute(f"UPDATE loss_maps SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?", (*values, map_id))
