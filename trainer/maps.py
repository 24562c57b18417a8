"""`python -m trainer.maps MAP_ID`: the loss map of some runs' paths, made in the background.

Every run keeps snapshots of its LoRA weights (trainer.landscape.Snapshots). The map takes all of them,
measured from the first run's start point θ_0, finds the plane of their two main directions (PCA: the two
leading right singular vectors of the matrix of displacements; uncentred, so the start stays at the
origin), evaluates the probe batch's loss on a grid over that plane centred on θ_0, and projects each run's
path onto it. Runs of one sweep share their seed, hence their LoRA initialisation: their paths all start
at the centre. The plane holds `explained` of the paths' movement; the rest is out of the picture (as
in Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", which draws paths the same way).

Progress and the result go into the `loss_maps` row; the server only reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import torch

from analysis.landscape import grid_axes
from store.db import configure_sqlite
from store.landscape import update_map
from store.processes import process_start_time
from store.settings import DataSettings
from store.tables import sqlite_time, utcnow
from trainer.batches import tokenize
from trainer.config import TrainConfig
from trainer.data import load_examples
from trainer.landscape import PROBE_EXAMPLES, Snapshots, batch_loss, probe_batch
from trainer.loop import pick_device, pick_precision
from trainer.measure import _views
from trainer.models import add_lora, load_base

log = logging.getLogger("trainer.maps")


class MapError(Exception):
    """A map that cannot be made from these runs; the message says why."""


def _runs(conn: sqlite3.Connection, run_ids: list[int]) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(run_ids))
    rows = conn.execute(f"SELECT id, config, learning_rate FROM runs WHERE id IN ({marks})", run_ids).fetchall()
    found = {r[0]: {"id": r[0], "config": json.loads(r[1]), "learning_rate": r[2]} for r in rows}
    missing = [r for r in run_ids if r not in found]
    if missing:
        raise MapError(f"no run with id {missing[0]}")
    return [found[r] for r in run_ids]


def _snapshots(home: Path, runs: list[dict[str, Any]]) -> list[Snapshots]:
    out: list[Snapshots] = []
    for run in runs:
        if run["config"].get("model") != runs[0]["config"].get("model"):
            raise MapError(f"run {run['id']} trains another model than run {runs[0]['id']}: one map needs one model")
        snaps = Snapshots.load(home / "runs" / str(run["id"]))
        if snaps is None or snaps.start is None:
            raise MapError(f"run {run['id']} kept no weight snapshots (its map_snapshots was 0, or it never trained)")
        if out and snaps.names != out[0].names:
            raise MapError(f"run {run['id']} trains other tensors than run {runs[0]['id']}: one map needs one model")
        out.append(snaps)
    return out


def plane(points: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The two orthonormal directions that hold most of `points` (rows, measured from the origin) and the
    fraction of their squared length they hold."""
    _, s, vh = torch.linalg.svd(points.double(), full_matrices=False)
    total = float((s**2).sum())
    explained = float((s[:2] ** 2).sum()) / total if total > 0 else 0.0
    dirs = vh[:2].float()
    if dirs.shape[0] < 2:  # a single point besides the origin: any second direction at right angles
        extra = torch.randn(points.shape[1], generator=torch.Generator().manual_seed(0))
        extra -= (extra @ dirs[0]) * dirs[0]
        dirs = torch.stack([dirs[0], extra / extra.norm()])
    return dirs, explained


def make_map(home: Path, conn: sqlite3.Connection, map_id: int, run_ids: list[int], resolution: int) -> dict[str, Any]:
    started = time.perf_counter()
    runs = _runs(conn, run_ids)
    snaps = _snapshots(home, runs)
    origin = snaps[0].start
    assert origin is not None
    paths, blocks = [], []
    for run, snap in zip(runs, snaps, strict=True):
        steps, rel = snap.points()
        assert snap.start is not None
        blocks.append(rel + (snap.start - origin))  # measured from the first run's start
        paths.append({"run_id": run["id"], "learning_rate": run["learning_rate"], "steps": steps})
    dirs, explained = plane(torch.cat(blocks))
    # Orientation: the first run ends with both coordinates positive, so the same runs always look the same.
    end = blocks[0][-1] @ dirs.T
    dirs = dirs * torch.where(end < 0, -1.0, 1.0)[:, None]
    coords = [block @ dirs.T for block in blocks]  # each path in the plane's coordinates, projected once
    for path, xy in zip(paths, coords, strict=True):
        path["x"], path["y"] = xy[:, 0].tolist(), xy[:, 1].tolist()
    xs, ys = grid_axes(torch.cat(coords).numpy(), resolution)

    cfg = TrainConfig.model_validate(runs[0]["config"])
    device = pick_device(cfg)
    dtype = pick_precision(cfg, device)
    model, tok = load_base(cfg.model, home / "models")
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg).to(device)
    weights = [p.detach() for p in model.parameters() if p.requires_grad]
    train_examples, eval_examples = load_examples(cfg.dataset, home / "datasets", cfg.seed)
    probe = probe_batch(  # the batch the runs' probes used: the first held-out examples of the first run's data
        [tokenize(e, tok, cfg.max_seq_len) for e in eval_examples[:PROBE_EXAMPLES]],
        [tokenize(e, tok, cfg.max_seq_len) for e in train_examples[:PROBE_EXAMPLES]],
        tok.pad_token_id,
    ).to(device)
    origin_d, dirs_d = origin.to(device), dirs.to(device)
    losses: list[list[float | None]] = []
    for j, y in enumerate(ys):
        row = []
        for x in xs:
            point = origin_d + float(x) * dirs_d[0] + float(y) * dirs_d[1]
            torch._foreach_copy_(weights, _views(point, weights))
            value = float(batch_loss(model, probe, device, dtype))
            row.append(value if math.isfinite(value) else None)
        losses.append(row)
        update_map(conn, map_id, progress=(j + 1) / len(ys))
    centre = resolution // 2
    return {
        "xs": xs.tolist(),
        "ys": ys.tolist(),
        "losses": losses,
        "paths": paths,
        "explained": explained,
        "centre_loss": losses[centre][centre],
        "origin_run": runs[0]["id"],
        "dataset": cfg.dataset,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m trainer.maps MAP_ID", file=sys.stderr)
        return 2
    map_id = int(args[0])
    settings = DataSettings()
    with contextlib.closing(sqlite3.connect(settings.db_path, timeout=30)) as conn:
        configure_sqlite(conn)
        row = conn.execute("SELECT run_ids, resolution FROM loss_maps WHERE id = ?", (map_id,)).fetchone()
        if row is None:
            print(f"no map with id {map_id}", file=sys.stderr)
            return 2
        me = os.getpid()
        update_map(conn, map_id, status="running", pid=me, pid_start=process_start_time(me), progress=0.0)
        try:
            result = make_map(settings.home, conn, map_id, json.loads(row[0]), row[1])
        except Exception as exc:
            error = str(exc) if isinstance(exc, MapError) else f"{type(exc).__name__}: {exc}"
            update_map(conn, map_id, status="failed", error=error, finished_at=sqlite_time(utcnow()))
            log.exception("map %d failed", map_id)
            return 1
        update_map(conn, map_id, status="completed", progress=1.0, result=result, finished_at=sqlite_time(utcnow()))
        log.info("map %d: %d runs on a %d-point grid in %.1f s", map_id, len(result["paths"]), row[1] ** 2,
                 result["seconds"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
