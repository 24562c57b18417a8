"""The walk down the mountain, recorded while a run trains: beyond the loss, what each stride did.

- **Cross-sections of steps.** At step 1 and every `probe_every` steps the loss of a fixed probe batch is
  evaluated along the step just taken, `L(θ_before + α·Δθ)` for α in PROBE_ALPHAS; where it is lowest says
  how long the stride was for the valley (analysis.landscape).
- **Which modules moved.** At step 1 and every `module_norms_every` steps each LoRA tensor's update norm and
  weight norm (the per-tensor norms of the flat buffers StepMeter already keeps).
- **Snapshots for the map.** The start point θ_0 in fp32 and `map_snapshots` displacements θ_t − θ_0,
  spread evenly over the run, in fp16 (a displacement keeps fp16's relative precision; θ_t itself would
  lose the small moves of a low rate to rounding). `trainer.maps` projects them onto a plane.
- **LoRA+.** With `loraplus_lr_ratio` the A and B matrices learn at different rates; each group's rate is
  recorded every step as the scalars `lr/A` and `lr/B`.

Like the step metrics, the device values are copied to the host without waiting for the device, and reach
the recorder when they have landed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.landscape import PROBE_ALPHAS, best_alpha
from store.landscape import SNAPSHOTS_FILE, ModuleRow, ProbeRow
from store.scalars import ScalarRow
from trainer.batches import Batch, collate
from trainer.config import TrainConfig
from trainer.measure import _views

PROBE_EXAMPLES = 8
"""Held-out examples in the probe batch. Nine forwards of it cost about four training steps at batch 8 (with
LoRA a backward costs about one forward: the frozen weights get no gradient), so probing every 200 steps adds
about 2% (bench/landscape.py measured 4.25 steps on the default model)."""


_LORA_NAME = re.compile(r"(?:^|\.)((?:layers|h|blocks)\.\d+\..*?lora_[AB])(?:\.|$)")


def tensor_names(model: torch.nn.Module) -> list[str]:
    """Short names of the trainable tensors in parameter order, e.g. `layers.3.self_attn.q_proj.lora_A`."""
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            found = _LORA_NAME.search(name)
            names.append(found.group(1) if found else name.removesuffix(".default.weight"))
    return names


def probe_batch(eval_enc: list[Any], train_enc: list[Any], pad_id: int) -> Batch:
    """The fixed batch every probe and map evaluates: the first held-out examples (training ones without)."""
    return collate((eval_enc or train_enc)[:PROBE_EXAMPLES], pad_id)


def batch_loss(model: Any, batch: Batch, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """The batch's mean token loss, in eval mode and without gradients, on the device."""
    model.eval()
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            num_items_in_batch=max(1, batch.n_loss_tokens),
        )
    return out.loss.detach().float()


@torch.no_grad()
def line_losses(
    weights: list[torch.Tensor],
    back: torch.Tensor,
    loss: Callable[[], torch.Tensor],
    alphas: Sequence[float] = PROBE_ALPHAS,
) -> torch.Tensor:
    """`loss()` at θ_before + α·Δθ for each α, where `weights` hold θ_after and `back` is θ_before − θ_after
    (flat): the point is θ_after + (1 − α)·back. The weights are put back bit for bit afterwards."""
    saved = torch.cat([w.reshape(-1) for w in weights])
    saved_views, back_views = _views(saved, weights), _views(back, weights)
    losses = []
    try:
        for alpha in alphas:
            torch._foreach_copy_(weights, saved_views)
            torch._foreach_add_(weights, back_views, alpha=1.0 - alpha)
            losses.append(loss())
    finally:
        torch._foreach_copy_(weights, saved_views)
    return torch.stack(losses)


def _to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device tensor to the host; the event says when it has landed (None: it has)."""
    if tensor.device.type != "cuda":
        return tensor.detach().clone(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class _Pending:
    kind: str  # "probe" | "modules"
    step: int
    values: torch.Tensor
    event: torch.cuda.Event | None

    def landed(self) -> bool:
        return self.event is None or self.event.query()


# --- snapshots -----------------------------------------------------------------------------------------


def snapshot_steps(count: int, total_steps: int) -> set[int]:
    """`count` steps spread evenly over the run, always including the last (step 0, the start, is kept too)."""
    if count <= 0:
        return set()
    every = max(1, -(-total_steps // count))
    return {*range(every, total_steps + 1, every), total_steps}


@dataclass
class Snapshots:
    """θ_0 (fp32) and displacements θ_t − θ_0 (fp16) at the chosen steps; on the host, filled without a sync."""

    names: list[str]
    start: torch.Tensor | None = None
    steps: list[int] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)
    events: list[torch.cuda.Event | None] = field(default_factory=list)
    start_event: torch.cuda.Event | None = None

    def take(self, step: int, weights: list[torch.Tensor]) -> None:
        flat = torch.cat([w.reshape(-1) for w in weights]).float()
        if self.start is None:  # the start point, kept whole
            self.start, self.start_event = _to_host(flat)
            return
        host, event = _to_host((flat - self.start.to(flat.device, non_blocking=True)).half())
        self.steps.append(step)
        self.deltas.append(host)
        self.events.append(event)

    def save(self, run_dir: Path) -> None:
        """Write them (atomically) to the run's folder, after the copies have landed."""
        if self.start is None:
            return
        for event in [self.start_event, *self.events]:
            if event is not None:
                event.synchronize()
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / SNAPSHOTS_FILE
        part = target.with_suffix(".part")
        deltas = torch.stack(self.deltas) if self.deltas else torch.zeros((0, self.start.numel()), dtype=torch.half)
        torch.save({"names": self.names, "start": self.start, "steps": self.steps, "deltas": deltas}, part)
        os.replace(part, target)

    @classmethod
    def load(cls, run_dir: Path, upto: int | None = None) -> Snapshots | None:
        """A run's saved snapshots (up to step `upto`, for a resumed run); None if it kept none."""
        path = run_dir / SNAPSHOTS_FILE
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        keep = [i for i, step in enumerate(saved["steps"]) if upto is None or step <= upto]
        return cls(
            names=list(saved["names"]),
            start=saved["start"],
            steps=[saved["steps"][i] for i in keep],
            deltas=[saved["deltas"][i] for i in keep],
            events=[None] * len(keep),
        )

    def points(self) -> tuple[list[int], torch.Tensor]:
        """(steps, positions) with the start as step 0: positions are θ_t − θ_0, fp32, one row per step."""
        assert self.start is not None
        rows = [torch.zeros_like(self.start), *(d.float() for d in self.deltas)]
        return [0, *self.steps], torch.stack(rows)


# --- during a run ----------------------------------------------------------------------------------------


class Walk:
    """What a run records beyond the step metrics; the loop calls `start`, `after_step` and `arrived`."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        weights: list[torch.Tensor],
        meter: Any,
        probe: Batch,
        device: torch.device,
        dtype: torch.dtype | None,
        total_steps: int,
        groups: dict[int, str],
    ) -> None:
        self.cfg, self.model, self.weights, self.meter = cfg, model, weights, meter
        self.probe = probe.to(device)
        self.device, self.dtype = device, dtype
        self.total_steps = total_steps
        self.groups = groups
        self.snapshots = Snapshots(tensor_names(model))
        self.snapshot_at = snapshot_steps(cfg.map_snapshots, total_steps)
        self.pending: list[_Pending] = []
        self.rates: list[ScalarRow] = []

    @property
    def names(self) -> list[str]:
        return self.snapshots.names

    def start(self, run_dir: Path | None, resumed_at: int) -> None:
        """Take the start point, or (resuming) take back the snapshots saved up to the checkpoint."""
        if not self.snapshot_at:
            return
        saved = Snapshots.load(run_dir, upto=resumed_at) if run_dir is not None and resumed_at else None
        if saved is not None and saved.names == self.names:
            self.snapshots = saved
        else:
            self.snapshots.take(0, self.weights)

    def _due(self, every: int, step: int) -> bool:
        return bool(every) and (step == 1 or step % every == 0 or step == self.total_steps)

    def after_step(self, step: int, rates: list[float]) -> None:
        """After the optimizer's step: probe, measure modules and snapshot when due (all queued on the device)."""
        if len(self.groups) > 1:  # one rate for all is the `lr` column already
            self.rates += [(f"lr/{name}", step, rates[i]) for i, name in self.groups.items()]
        if self._due(self.cfg.module_norms_every, step):
            self.pending.append(_Pending("modules", step, *_to_host(self.meter.tensor_norms())))
        if self._due(self.cfg.probe_every, step):
            losses = line_losses(self.weights, self.meter.last_update(), self._probe_loss)
            self.pending.append(_Pending("probe", step, *_to_host(losses)))
        if step in self.snapshot_at:
            self.snapshots.take(step, self.weights)

    def _probe_loss(self) -> torch.Tensor:
        return batch_loss(self.model, self.probe, self.device, self.dtype)

    def arrived(self, wait: bool = False) -> Iterator[tuple[list[ProbeRow], list[ModuleRow], list[ScalarRow]]]:
        """What has reached the host (everything, when `wait`), as rows for the recorder."""
        probes: list[ProbeRow] = []
        modules: list[ModuleRow] = []
        while self.pending and (wait or self.pending[0].landed()):
            item = self.pending.pop(0)
            if item.event is not None:
                item.event.synchronize()
            values = [_finite(v) for v in item.values.reshape(-1).tolist()]
            if item.kind == "probe":
                probes.append((item.step, list(PROBE_ALPHAS), values, best_alpha(PROBE_ALPHAS, values)))
            else:
                half = len(values) // 2
                modules.append((item.step, values[:half], values[half:]))
        rates, self.rates = self.rates, []
        if probes or modules or rates:
            yield probes, modules, rates

    def save(self, run_dir: Path) -> None:
        if self.snapshot_at:
            self.snapshots.save(run_dir)


def rate_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[int, str]:
    """Index -> name of the parameter groups that hold tensors: `A`/`B` when a group holds only LoRA A or only
    LoRA B matrices (as LoRA+'s do), else the index. peft's LoRA+ optimizer also makes empty groups (embeddings,
    B without decay), which have no rate worth recording."""
    names_of = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        kinds = {"B" if "lora_B" in names_of.get(id(p), "") else "A" for p in group["params"]}
        if kinds:
            out[i] = kinds.pop() if len(kinds) == 1 else str(i)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
