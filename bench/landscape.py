"""What the walk costs (issue 13): a probe along a step and a loss map, against the training steps they describe.

One process, the default config (SmolLM2 on synthetic-arithmetic, batch 8) unless told otherwise. Blocks of
training steps alternate with probes, so drift in machine speed hits both alike; medians are compared:

- a probe (nine forwards of the probe batch along the step just taken) in training steps, and what
  `probe_every` = 10, 100, 200 (the default) and 1000 add to a run's time;
- the per-tensor norms (`module_norms_every`) and a weight snapshot (`map_snapshots`), likewise;
- a loss map: one grid point (weights set on the plane, one probe-batch forward) times resolution², against a
  run of the default length.

    .venv/bin/python bench/landscape.py                              # default model
    .venv/bin/python bench/landscape.py --model tiny-random-llama --blocks 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import make_config  # noqa: E402
from trainer.landscape import PROBE_ALPHAS, Snapshots, batch_loss, line_losses  # noqa: E402
from trainer.loop import Setup, apply_update, forward_backward, setup  # noqa: E402
from trainer.measure import _views  # noqa: E402


def sync(s: Setup) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def timed(s: Setup, work: Callable[[], object], repeat: int = 1) -> float:
    sync(s)
    t0 = time.perf_counter()
    for _ in range(repeat):
        work()
    sync(s)
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--blocks", type=int, default=5, help="pairs of (training block, probe)")
    parser.add_argument("--block-steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=21)
    parser.add_argument("--home", type=Path, default=None, help="data dir (model cache); default: a temp dir")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="stepscope-bench-"))
    cfg = make_config({"model": args.model, "eval_every": 0, "probe_every": 0, "module_norms_every": 0,
                       "map_snapshots": 0})  # fmt: skip
    s = setup(cfg, home)
    s = dataclasses.replace(s, eval_set=[])
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16)
    dtype = s.autocast_dtype or torch.float32
    print(f"model {args.model} on {s.device} ({dtype}), batch {cfg.batch_size}, "
          f"{s.plan['trainable_params']:,} trainable parameters, {s.total_steps} steps a run")  # fmt: skip

    def train_step() -> None:
        forward_backward(s, next(s.batches), scaler)
        apply_update(s, scaler)

    probe = s.walk.probe

    def one_probe() -> None:
        line_losses(
            s.meter.weights, s.meter.last_update(), lambda: batch_loss(s.model, probe, s.device, s.autocast_dtype)
        )

    snaps = Snapshots(s.walk.names)
    snaps.take(0, s.meter.weights)
    for _ in range(3):
        train_step()  # warm-up
    times: dict[str, list[float]] = {"step": [], "probe": [], "norms": [], "snapshot": [], "point": []}
    origin = torch.cat([w.reshape(-1) for w in s.meter.weights])
    dirs = torch.randn(2, origin.numel(), device=origin.device) * 1e-3

    def grid_point() -> None:
        torch._foreach_copy_(s.meter.weights, _views(origin + 0.5 * dirs[0] - 0.5 * dirs[1], s.meter.weights))
        batch_loss(s.model, probe, s.device, s.autocast_dtype)

    for _ in range(args.blocks):
        times["step"].append(timed(s, train_step, args.block_steps))
        times["probe"].append(timed(s, one_probe))
        times["norms"].append(timed(s, s.meter.tensor_norms, 10))
        times["snapshot"].append(timed(s, lambda: snaps.take(1, s.meter.weights)))
        saved = [w.clone() for w in s.meter.weights]
        times["point"].append(timed(s, grid_point, 3))
        torch._foreach_copy_(s.meter.weights, saved)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["step"]
    print(f"training step      : {step * 1000:9.1f} ms (median of {args.blocks} blocks of {args.block_steps})")
    print(f"probe ({len(PROBE_ALPHAS)} forwards)  : {med['probe'] * 1000:9.1f} ms = {med['probe'] / step:.2f} steps")
    for every in (10, 100, 200, 1000):
        print(f"probe_every={every:<5}  : +{100 * med['probe'] / (every * step):.2f}% of the run's time")
    print(
        f"module norms       : {med['norms'] * 1000:9.3f} ms; every 10 steps +{100 * med['norms'] / (10 * step):.3f}%"
    )
    run = s.total_steps * step
    print(f"weight snapshot    : {med['snapshot'] * 1000:9.3f} ms; 20 a run +{100 * 20 * med['snapshot'] / run:.3f}%")
    n = args.resolution**2
    side = args.resolution
    print(f"map grid point     : {med['point'] * 1000:9.1f} ms; {side}x{side} = {n * med['point']:.1f} s")
    print(f"map / run time     : {n * med['point'] / run:.3f} (a {s.total_steps}-step run takes {run:.0f} s)")
    print(f"ratio probe_every=200 {1 + med['probe'] / (200 * step):.3f}")


if __name__ == "__main__":
    main()
