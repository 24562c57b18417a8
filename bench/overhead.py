"""Recording overhead: the same training steps with stepscope's recording on and off, in one process.

"On" is the real loop (`trainer.loop.fit`: update/parameter norms on the device, a device buffer,
batched copies to the host, a background SQLite writer). "Off" is a bare loop over the same
forward/backward, clipping and optimizer step. Blocks of steps alternate (on, off, on, off, ...) so
drift in machine speed hits both sides alike, and each pair swaps which side goes first; the median
block time per step is compared.

    .venv/bin/python bench/overhead.py                      # default model on this machine
    .venv/bin/python bench/overhead.py --model tiny-random-llama --blocks 6 --block-steps 20

The last line is `ratio X.XXX` (on / off step time); the target is <= 1.02.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store.db import upgrade  # noqa: E402
from trainer.config import make_config  # noqa: E402
from trainer.loop import Setup, StopFlag, fit, forward_backward, setup  # noqa: E402
from trainer.recorder import Recorder, new_run  # noqa: E402


def sync(s: Setup) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def steps_off(s: Setup, n: int, scaler: torch.amp.GradScaler) -> None:
    """The same work without any measurement or recording."""
    for _ in range(n):
        forward_backward(s, next(s.batches), scaler)
        scaler.unscale_(s.optimizer)
        if s.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(s.params, s.cfg.max_grad_norm, foreach=True)
        scaler.step(s.optimizer)
        scaler.update()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6, help="blocks per side")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--home", type=Path, default=None, help="data dir (model cache); default: a temp dir")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="stepscope-bench-"))
    db = home / "stepscope.db"
    upgrade(f"sqlite:///{db}")
    # Text long enough to fill max_seq_len, so the step has the shape of a real fine-tune.
    data = home / "datasets" / "long.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(f'{{"text": "{" ".join(["step size matters"] * 60)} {i}"}}\n' for i in range(400)))
    # Probes along steps are an analysis with their own cost (bench/landscape.py), not recording: off here. The
    # per-tensor norms and weight snapshots are recorded like the step rows, so they stay on.
    cfg = make_config({"model": args.model, "dataset": "long.jsonl", "batch_size": args.batch_size,
                       "max_seq_len": args.max_seq_len, "eval_every": 0, "learning_rate": 1e-4,
                       "probe_every": 0})  # fmt: skip
    s = setup(cfg, home)
    print(f"model {args.model} on {s.device} ({s.autocast_dtype or torch.float32}), batch {args.batch_size}x"
          f"{args.max_seq_len}, {s.plan['trainable_params']:,} trainable parameters")  # fmt: skip
    run_id = new_run(f"sqlite:///{db}", cfg)
    recorder = Recorder(db, run_id)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16)
    # No eval in the timed blocks: the loop evaluates at its last step, which would not be recording cost.
    s = dataclasses.replace(s, eval_set=[])
    on_block = dataclasses.replace(s, total_steps=args.block_steps)

    steps_off(s, args.warmup_steps, scaler)
    fit(dataclasses.replace(s, total_steps=args.warmup_steps), recorder, StopFlag())
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.blocks):
        for side in ("on", "off") if i % 2 == 0 else ("off", "on"):  # neither side always goes first
            sync(s)
            t0 = time.perf_counter()
            if side == "on":
                fit(on_block, recorder, StopFlag())
            else:
                steps_off(s, args.block_steps, scaler)
            sync(s)
            times[side].append((time.perf_counter() - t0) / args.block_steps)
    recorder.close()

    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"step time, recording on : {on * 1000:8.2f} ms (median of {args.blocks} blocks of {args.block_steps})")
    print(f"step time, recording off: {off * 1000:8.2f} ms")
    print(f"ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
