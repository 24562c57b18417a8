"""The training loop: LoRA fine-tuning that measures what every optimizer step did to the weights.

Per step it records loss, the lr actually used, the gradient norm before clipping, the update norm
‖θ_after − θ_before‖, the parameter norm and whether the step overshot (`trainer.measure`). For plain
SGD the update is exactly lr·grad, so `step_scale = update_norm / (lr · grad_norm)` is 1; for Adam it
is not, and that is worth seeing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sqlite3
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from analysis.range_test import RangeTestStop, lr_range_suggestions
from analysis.runs import DIVERGED_LOSS_FACTOR, diverged_loss, summarize_run
from analysis.smoothing import DebiasedEma
from store.landscape import SNAPSHOTS_FILE
from store.processes import process_start_time
from store.tables import STEP_COLUMNS, RunStatus, utcnow
from trainer import checkpoints
from trainer.batches import Batch, eval_batches, step_batches, tokenize
from trainer.config import TrainConfig
from trainer.data import load_examples, plan_steps
from trainer.generate import Prompt, accuracy, greedy_answers, pick_prompts
from trainer.landscape import Walk, probe_batch, rate_groups
from trainer.measure import StepMeter
from trainer.models import add_lora, count_params, load_base
from trainer.recorder import Recorder

log = logging.getLogger(__name__)

FLUSH_STEPS = 32  # copy metrics to the host at least every this many steps ...
FLUSH_SECONDS = 0.5  # ... or this often, so a killed job loses at most about a second of rows
# The divergence guard smooths over about ten steps (1 / (1 - 0.9)): one bad batch cannot end a run.
DIVERGENCE_SMOOTHING = 0.9
# GradScaler halves its scale on every overflow and starts at 2^16: 24 halvings in a row bring it to
# 2^-8, where finite gradients no longer overflow, so the gradients themselves are not finite.
FP16_MAX_SKIPS_IN_A_ROW = 24


@dataclass
class Outcome:
    status: str  # completed | diverged | cancelled | interrupted
    steps: int
    error: str | None = None
    error_step: int | None = None


@dataclass
class Setup:
    cfg: TrainConfig
    model: Any
    device: torch.device
    autocast_dtype: torch.dtype | None
    params: list[torch.nn.Parameter]
    meter: StepMeter
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Iterator[list[Batch]]
    eval_set: list[Batch]
    updates_per_epoch: int
    total_steps: int
    walk: Walk
    plan: dict[str, Any] = field(default_factory=dict)
    tok: Any = None
    prompts: list[Prompt] = field(default_factory=list)
    """Held-out prompts answered at each eval step (trainer.generate); none when generate_count is 0."""


class StopFlag:
    """Set by a signal; the loop finishes the current step, then stops cleanly. Why it stops decides how the run
    ends: a user's cancel (SIGTERM, Ctrl-C) is `cancelled`, a server shutting down (SIGUSR1) `interrupted`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.outcome = "cancelled"

    def set(self, *_: object) -> None:
        self._event.set()

    def interrupt(self, *_: object) -> None:
        if not self._event.is_set():
            self.outcome = "interrupted"
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


# --- setup -----------------------------------------------------------------------------------------


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {cfg.device} requested but no CUDA GPU is available")
    return torch.device(cfg.device)


def pick_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def make_optimizer(cfg: TrainConfig, model: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW; with `loraplus_lr_ratio`, peft's LoRA+ groups: B matrices at that many times the rate."""
    lr = cfg.range_min_lr if cfg.kind == "lr_range_test" else cfg.learning_rate
    cls: Any = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    if cfg.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, cls, lr=lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio, loraplus_weight_decay=cfg.weight_decay, **extra
        )
    return cls(params, lr=lr, weight_decay=cfg.weight_decay, **extra)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    if cfg.kind == "lr_range_test":
        # lr grows exponentially from range_min_lr to range_max_lr over the run.
        ratio = cfg.range_max_lr / cfg.range_min_lr
        span = max(1, total_steps - 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: ratio ** (min(t, span) / span))
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def setup(cfg: TrainConfig, home: Path) -> Setup:
    """Load data, model and LoRA; build optimizer and schedule. Everything before the first step."""
    device = pick_device(cfg)
    train_examples, eval_examples = load_examples(cfg.dataset, home / "datasets", cfg.seed)
    model, tok = load_base(cfg.model, home / "models")
    torch.manual_seed(cfg.seed)  # LoRA init and dropout follow the run's seed
    model = add_lora(model, cfg).to(device)
    trainable, total = count_params(model)
    train_enc = [tokenize(e, tok, cfg.max_seq_len) for e in train_examples]
    eval_enc = [tokenize(e, tok, cfg.max_seq_len) for e in eval_examples]  # at most 200 (trainer.data.split_sizes)
    per_epoch, total_steps = plan_steps(
        len(train_enc), cfg.batch_size, cfg.grad_accum_steps, cfg.epochs, cfg.step_limit
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, model, params)
    plan = {
        "n_train": len(train_enc),
        "n_eval": len(eval_enc),
        "updates_per_epoch": per_epoch,
        "total_steps": total_steps,
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device),
    }
    meter = StepMeter(params)
    autocast_dtype = pick_precision(cfg, device)
    walk = Walk(
        cfg, model, meter.weights, meter, probe_batch(eval_enc, train_enc, tok.pad_token_id), device,
        autocast_dtype, total_steps, rate_groups(optimizer, model),
    )  # fmt: skip
    plan["lora_tensors"] = walk.names
    return Setup(
        cfg=cfg,
        model=model,
        device=device,
        autocast_dtype=autocast_dtype,
        params=params,
        meter=meter,
        optimizer=optimizer,
        scheduler=make_scheduler(cfg, optimizer, total_steps),
        batches=step_batches(train_enc, cfg.batch_size, cfg.grad_accum_steps, tok.pad_token_id, cfg.seed),
        eval_set=eval_batches(eval_enc, cfg.batch_size, tok.pad_token_id),
        updates_per_epoch=per_epoch,
        total_steps=total_steps,
        walk=walk,
        plan=plan,
        tok=tok,
        prompts=pick_prompts(eval_examples, tok, cfg.generate_count, cfg.max_seq_len)
        if cfg.generate_max_new_tokens
        else [],
    )


# --- one step ----------------------------------------------------------------------------------------


def _forward(s: Setup, batch: Batch, n_items: int) -> torch.Tensor:
    """The batch's summed token losses over `n_items`: the micro-batches of a step add up to its
    token-weighted mean, as Hugging Face's Trainer does with `num_items_in_batch` (a mean per micro-batch
    would weigh a token of a short micro-batch more than one of a long one)."""
    with torch.autocast(s.device.type, dtype=s.autocast_dtype or torch.float32, enabled=s.autocast_dtype is not None):
        out = s.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            num_items_in_batch=max(1, n_items),
        )
    return out.loss


def forward_backward(s: Setup, micro: list[Batch], scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Accumulate gradients over the step's micro-batches; return the step's loss, the mean over all its
    loss tokens (on the device)."""
    s.model.train()
    n_items = sum(b.n_loss_tokens for b in micro)
    total = torch.zeros((), device=s.device)
    for batch in micro:
        loss = _forward(s, batch.to(s.device), n_items)
        scaler.scale(loss).backward()
        total += loss.detach().float()
    return total


def apply_update(s: Setup, scaler: torch.amp.GradScaler) -> list[torch.Tensor]:
    """Clip, step and measure: [grad_norm, update_norm, param_norm, update_cos, grad_alignment] on the device.

    With fp16 an overflowing step is skipped by the scaler (its gradient norm is not finite, the update 0).
    """
    scaler.unscale_(s.optimizer)
    grad_norm, alignment = s.meter.before_step()
    if s.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(s.params, s.cfg.max_grad_norm, grad_norm, foreach=True)
    scaler.step(s.optimizer)
    scaler.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    update_norm, param_norm, update_cos = s.meter.after_step()
    return [grad_norm.float(), update_norm, param_norm, update_cos, alignment]


@torch.no_grad()
def evaluate(s: Setup) -> torch.Tensor | None:
    """Eval loss over the held-out set, the mean over all its loss tokens, left on the device."""
    if not s.eval_set:
        return None
    s.model.eval()
    n_items = sum(b.n_loss_tokens for b in s.eval_set)
    return torch.stack([_forward(s, b.to(s.device), n_items).float() for b in s.eval_set]).sum()


def answer_prompts(s: Setup, recorder: Recorder, step: int) -> None:
    """Record the greedy answers to the held-out prompts and their accuracy. Decoding reads tokens back to the
    host, so this waits for the device: at eval steps only, with bounded count and length."""
    answers = greedy_answers(s.model, s.tok, s.prompts, s.cfg.generate_max_new_tokens, s.device, s.autocast_dtype)
    rows = [(step, a.index, s.prompts[a.index].prompt, s.prompts[a.index].expected, a.output, a.exact, a.overlap)
            for a in answers]  # fmt: skip
    recorder.generations(step, rows, accuracy(answers))


# --- recording -----------------------------------------------------------------------------------------


HostFields = tuple[int, float, int, int, float, float, float]  # step, epoch, samples, tokens, lr, wall, dt
StepRow = tuple[Any, ...]  # (step, *STEP_COLUMNS)
DEVICE_VALUES = 6  # per step: loss, grad_norm, update_norm, param_norm, update_cos, grad_alignment
EvalRow = tuple[int, float | None, float]  # (step, eval_loss, wall_time)


Problem = tuple[str, int]  # (why the run diverged, at which step)
Deliver = Callable[[list[StepRow], list[EvalRow]], Problem | None]


@dataclass
class _Copy:
    """A batch of steps on its way to the host: the copy is queued on the GPU, `event` says when it landed."""

    host: list[HostFields]
    evals: list[tuple[int, float]]
    values: torch.Tensor
    eval_values: torch.Tensor | None
    event: Any  # a torch.cuda.Event, or None when the copy was made on the CPU (it has landed then)
    scaled: bool
    """Whether fp16 loss scaling was on: a non-finite gradient then means a skipped step, not a broken run."""

    def rows(self) -> tuple[list[StepRow], list[EvalRow]]:
        if self.event is not None:
            self.event.synchronize()  # waits (sleeping: a blocking event) until the copy has landed
        rows = []
        for (step, epoch, samples, tokens, lr, wall, dt), (loss, gn, un, pn, cos, align) in zip(
            self.host, self.values.tolist(), strict=True
        ):
            update_ratio = un / pn if pn > 0 else None
            step_scale = un / (lr * gn) if lr > 0 and gn > 0 and math.isfinite(gn) else None
            skipped = self.scaled and not math.isfinite(gn)  # the fp16 scaler skipped this update
            rows.append((step, epoch, samples, tokens, _finite(loss), lr, _finite(gn), _finite(un), _finite(pn),
                         update_ratio, step_scale, wall, dt, _finite(cos), _finite(align), int(skipped)))  # fmt: skip
        eval_values = self.eval_values.tolist() if self.eval_values is not None else []
        evals = [(step, _finite(v), wall) for (step, wall), v in zip(self.evals, eval_values, strict=True)]
        return rows, evals


class StepBuffer:
    """Per-step metrics stay on the device; rows reach the host in batches, without the loop ever waiting.

    Calling `.item()` on a GPU tensor waits for the GPU to finish every queued kernel; doing that each
    step would stall the loop (and even one wait per batch drains the GPU's queue). Instead each step
    writes its device scalars into a device tensor; every FLUSH_STEPS steps or FLUSH_SECONDS the batch
    is copied to pinned host memory asynchronously, and a CUDA event says when it landed.

    Landed rows go to `deliver` (the loop's `record`: divergence guard, then the writer) at once. On the
    GPU a copy lands while the loop is already busy with the next step, which may take seconds, so a
    collector thread sleeps on each copy's event and delivers it the moment it lands: a kill -9 then
    loses only steps whose rows never reached the host. On the CPU a copy has landed when it is made,
    and the loop delivers it itself in `collect` (no thread). What a delivery returns (a divergence) or
    raises (the writer failed) reaches the loop at its next `collect`; copies after it are dropped, as
    the loop drops the steps after a divergence.
    """

    def __init__(self, device: torch.device, deliver: Deliver, scaled: bool = False) -> None:
        self.device = device
        self.deliver = deliver
        self.scaled = scaled
        self.values = torch.zeros((FLUSH_STEPS, DEVICE_VALUES), device=device)
        self.host: list[HostFields] = []
        self.evals: list[tuple[int, torch.Tensor, float]] = []
        self.last_copy = time.monotonic()
        self._copies: deque[_Copy] = deque()  # made, not yet delivered, oldest first
        self._outcomes: list[Problem | BaseException] = []  # what deliveries by the collector found
        self._ended = False  # a delivery found a divergence or failed: nothing more is delivered
        self._collecting = False  # a collector thread is running
        self._changed = threading.Condition()

    def add(self, device_values: list[torch.Tensor], host_values: HostFields) -> None:
        self.values[len(self.host)] = torch.stack(device_values)
        self.host.append(host_values)

    def due(self) -> bool:
        return len(self.host) >= FLUSH_STEPS or time.monotonic() - self.last_copy >= FLUSH_SECONDS

    def start_copy(self) -> None:
        """Queue the copy of the buffered steps to the host. Later writes to the device buffer are queued
        behind it on the same stream, so the buffer can be reused at once."""
        values = self.values[: len(self.host)]
        evals = torch.stack([v for _, v, _ in self.evals]) if self.evals else None
        if self.device.type == "cuda":
            values = _to_pinned(values)
            evals = _to_pinned(evals) if evals is not None else None
        else:
            values = values.clone()
        event = self._event()
        if event is not None:
            event.record()  # after the copies, on the same stream: it fires when they have landed
        meta = [(step, wall) for step, _, wall in self.evals]
        copy = _Copy(self.host, meta, values, evals, event, self.scaled)
        self.host, self.evals, self.last_copy = [], [], time.monotonic()
        with self._changed:
            if self._ended:
                return
            self._copies.append(copy)
            if event is not None and not self._collecting:
                self._collecting = True
                threading.Thread(target=self._collect_landed, name="stepscope-copies", daemon=True).start()

    def _event(self) -> Any:
        """The event that says when a copy landed; None on the CPU, where it lands as it is made."""
        # blocking: the collector sleeps until the copy lands instead of spinning a core (cudaEventBlockingSync)
        return torch.cuda.Event(blocking=True) if self.device.type == "cuda" else None

    def collect(self, wait: bool = False) -> Problem | None:
        """Deliver what has landed (all of it when `wait`); the first divergence a delivery found, if any.
        A failed delivery raises here, in the loop."""
        with self._changed:
            while self._copies and self._copies[0].event is None and not self._ended:  # the CPU's copies
                copy = self._copies.popleft()
                problem = self.deliver(*copy.rows())
                if problem is not None:
                    self._end()
                    return problem
            if wait:
                self._changed.wait_for(lambda: not self._copies)
            outcomes, self._outcomes = self._outcomes, []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return None

    def _collect_landed(self) -> None:
        """The collector thread: deliver each copy as its event fires, oldest first; end when none is left."""
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # the events belong to the training device (else device 0)
        while True:
            with self._changed:
                if not self._copies:
                    self._collecting = False
                    return
                copy = self._copies[0]
            try:
                outcome: Problem | BaseException | None = self.deliver(*copy.rows())
            except BaseException as exc:  # the writer failed: the loop raises it
                outcome = exc
            with self._changed:
                if self._copies and self._copies[0] is copy:
                    self._copies.popleft()
                if outcome is not None:
                    self._outcomes.append(outcome)
                    self._end()
                self._changed.notify_all()

    def _end(self) -> None:
        self._ended = True
        self._copies.clear()  # the steps after a divergence are dropped


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _finite(x: float) -> float | None:
    """SQLite stores NaN as NULL anyway; say so explicitly (and keep inf out of JSON)."""
    return x if math.isfinite(x) else None


class DivergenceGuard:
    """Stops a run that cannot recover, and only such a run.

    A train run diverged when its loss is no longer finite, or when its smoothed loss (EMA 0.9, about
    ten steps) rose far above where the run started: `DIVERGED_LOSS_FACTOR` times the first step's loss
    and at least `DIVERGED_MIN_RISE` above it (the analysis' rule). A run near zero loss that meets one
    noisy batch stays far below that. With fp16 an overflowing step is skipped, not fatal: only
    `FP16_MAX_SKIPS_IN_A_ROW` of them in a row (the loss scale has then halved that often, so the
    gradients overflow at any scale) ends the run. An LR range test stops as fastai's does, once its
    smoothed loss passes 4x its best: it blows up by design.
    """

    def __init__(self, kind: str = "train") -> None:
        self.range_stop = RangeTestStop() if kind == "lr_range_test" else None
        self.ema = DebiasedEma(DIVERGENCE_SMOOTHING)
        self.start: float | None = None
        self.best_raw = math.inf
        self.skips_in_a_row = 0

    def check(self, step: int, loss: float | None, grad_norm: float | None, skipped: bool = False) -> str | None:
        if loss is None:
            return f"loss became non-finite at step {step}"
        if skipped:
            self.skips_in_a_row += 1
            if self.skips_in_a_row >= FP16_MAX_SKIPS_IN_A_ROW:
                n = self.skips_in_a_row
                return f"the fp16 loss scale underflowed: {n} overflowing steps in a row by step {step}"
        elif grad_norm is None:
            return f"gradient norm became non-finite at step {step}"
        else:
            self.skips_in_a_row = 0
        self.best_raw = min(self.best_raw, loss)
        if self.range_stop is not None:
            if self.range_stop.update(loss):
                r = self.range_stop
                return f"smoothed loss {r.smoothed:.4g} rose above {r.factor:g}× its best ({r.best:.4g}) at step {step}"
            return None
        if self.start is None:
            self.start = loss
        smoothed = self.ema.update(loss)
        if diverged_loss(smoothed, self.start):
            return (
                f"smoothed loss {smoothed:.4g} rose above {DIVERGED_LOSS_FACTOR:g}× where the run started "
                f"({self.start:.4g}) at step {step}"
            )
        return None


class History:
    """Host copies of the columns the end-of-run analysis reads (8 bytes per value per step), and the evals."""

    COLUMNS = {  # positions in a step row
        "loss": 4, "lr": 5, "grad_norm": 6, "update_ratio": 9, "step_scale": 10, "update_cos": 13,
        "grad_alignment": 14,
    }  # fmt: skip

    def __init__(self) -> None:
        self.steps: array[int] = array("q")
        self.series: dict[str, array[float]] = {c: array("d") for c in self.COLUMNS}
        self.evals: list[tuple[int, float | None]] = []

    def extend(self, rows: list[tuple[Any, ...]], evals: Sequence[EvalRow] = ()) -> None:
        for row in rows:
            self.steps.append(row[0])
            for name, i in self.COLUMNS.items():
                self.series[name].append(math.nan if row[i] is None else row[i])
        self.evals += [(step, loss) for step, loss, _ in evals]

    def summary(self, status: str, kind: str) -> dict[str, Any]:
        series = {k: [None if math.isnan(v) else v for v in col] for k, col in self.series.items()}
        evals = ([step for step, _ in self.evals], [loss for _, loss in self.evals])
        result = summarize_run(list(self.steps), series, status=status, evals=evals)
        if kind == "lr_range_test":
            result["range_test"] = suggestion = lr_range_suggestions(list(self.series["lr"]), list(self.series["loss"]))
            # A verdict judges one constant rate; a range test sweeps them all and blows up by design.
            result["verdict"] = None
            result["next_lr"] = suggestion["suggested_lr"]
            lr = suggestion["suggested_lr"]
            result["reason"] = (
                f"LR range test: suggested learning rate {lr:.3g}." if lr else "LR range test: too short."
            )
        return result


def record(
    rows: list[StepRow], evals: list[EvalRow], guard: DivergenceGuard, recorder: Recorder, history: History
) -> Problem | None:
    """Hand rows that reached the host to the writer; return (reason, step) if the run diverged.

    Rows up to and including the first bad step are kept; steps computed after it are dropped.
    """
    problem = None
    for i, row in enumerate(rows):
        reason = guard.check(row[0], row[4], row[6], skipped=bool(row[15]))
        if reason:
            problem, rows = (reason, row[0]), rows[: i + 1]
            evals = [e for e in evals if e[0] <= row[0]]
            break
    recorder.steps(rows)
    recorder.evals(evals)
    history.extend(rows, evals)
    if rows:
        summary: dict[str, Any] = {"steps_done": rows[-1][0], "last_loss": rows[-1][4]}
        if math.isfinite(guard.best_raw):
            summary["best_loss"] = guard.best_raw
        if evals:
            summary["last_eval_loss"] = evals[-1][1]
        recorder.update_run(**summary)
    if recorder.error is not None:
        raise RuntimeError(f"recording failed: {recorder.error}")
    return problem


# --- the loop ------------------------------------------------------------------------------------------


def fit(
    s: Setup,
    recorder: Recorder,
    stop: StopFlag,
    progress: Any = None,
    history: History | None = None,
    run_dir: Path | None = None,
    resume: dict[str, Any] | None = None,
) -> Outcome:
    """The steps of a run (from a checkpoint's step on, given `resume`), checkpointing into `run_dir`."""
    cfg = s.cfg
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16)
    guard, history = DivergenceGuard(cfg.kind), history if history is not None else History()
    deliver = functools.partial(record, guard=guard, recorder=recorder, history=history)
    buffer = StepBuffer(s.device, deliver, scaled=scaler.is_enabled())
    at = restore(s, scaler, resume) if resume is not None else checkpoints.Resumed(0, 0, 0, 0.0)
    _replay(guard, history)
    samples, tokens = at.samples, at.tokens
    start = last = time.perf_counter() - at.wall_time
    last_checkpoint = time.monotonic()
    step = at.step
    s.walk.start(run_dir, at.step)
    for step in range(at.step + 1, s.total_steps + 1):
        micro = next(s.batches)
        rates = s.scheduler.get_last_lr()  # the rates this update uses, per parameter group (host floats: no sync)
        lr = rates[0]

        # forward/backward, then update (all on the device)
        loss = forward_backward(s, micro, scaler)
        measured = apply_update(s, scaler)
        s.walk.after_step(step, rates)  # probes, module norms, snapshots: when due, queued on the device

        # record: host-side counters and device scalars; no .item() here, it would sync the GPU each step
        samples += sum(b.n_samples for b in micro)
        tokens += sum(b.n_tokens for b in micro)
        now = time.perf_counter()
        buffer.add([loss, *measured],
                   (step, step / s.updates_per_epoch, samples, tokens, lr, now - start, now - last))  # fmt: skip
        last = now
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == s.total_steps:
            eval_loss = evaluate(s)
            if eval_loss is not None:
                buffer.evals.append((step, eval_loss, time.perf_counter() - start))
            if s.prompts:
                answer_prompts(s, recorder, step)
        if progress is not None:
            progress.update(1)

        # stop conditions: divergence is checked as batches of metrics reach the host
        checkpoint = run_dir is not None and _checkpoint_due(cfg, step, s.total_steps, last_checkpoint, stop)
        last_step = stop.requested or step == s.total_steps or checkpoint
        if buffer.due() or last_step:
            buffer.start_copy()
        problem = buffer.collect(wait=last_step)
        if problem and cfg.kind == "lr_range_test":
            return Outcome("completed", problem[1])  # a range test ends by design once the loss blows up
        if problem:
            return Outcome("diverged", problem[1], error=problem[0], error_step=problem[1])
        for probes, modules, scalars in s.walk.arrived(wait=last_step):
            recorder.walk(probes, modules, scalars)
        if checkpoint:  # every row up to this step is committed first: a resumed run starts right after them
            assert run_dir is not None
            recorder.flush()
            s.walk.save(run_dir)
            saved = checkpoints.save(run_dir, _state(s, scaler, step, samples, tokens, time.perf_counter() - start))
            recorder.files(run_dir, [*_walk_files(run_dir), checkpoints.relative(saved, run_dir)])
            last_checkpoint = time.monotonic()
        if stop.requested:
            return Outcome(stop.outcome, step)
    return Outcome("completed", step)


# --- checkpoints ---------------------------------------------------------------------------------------


def _replay(guard: DivergenceGuard, history: History) -> None:
    """Bring a resumed run's divergence guard to where it was, from the rows recorded before."""
    series = history.series
    for step, loss, gn in zip(history.steps, series["loss"], series["grad_norm"], strict=True):
        guard.check(step, None if math.isnan(loss) else loss, None if math.isnan(gn) else gn)


def _checkpoint_due(cfg: TrainConfig, step: int, total: int, last: float, stop: StopFlag) -> bool:
    """Every `checkpoint_every` steps, at least every CHECKPOINT_SECONDS, and when the server shuts down
    (a cancelled or finished run is not resumed; a range test is cheap to run again)."""
    if not cfg.checkpoint_every or cfg.kind == "lr_range_test" or step == total:
        return False
    if stop.requested:
        return stop.outcome == "interrupted"
    return step % cfg.checkpoint_every == 0 or time.monotonic() - last >= checkpoints.CHECKPOINT_SECONDS


def _state(s: Setup, scaler: torch.amp.GradScaler, step: int, samples: int, tokens: int, wall: float) -> dict[str, Any]:
    # The copies to the host wait for the GPU: once per checkpoint, not per step.
    return {
        "step": step,
        "samples": samples,
        "tokens": tokens,
        "wall_time": wall,
        "trainable": [p.detach().cpu().clone() for p in s.params],
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "meter": s.meter.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if s.device.type == "cuda" else None,
    }


def restore(s: Setup, scaler: torch.amp.GradScaler, state: dict[str, Any]) -> checkpoints.Resumed:
    """Put a run back where its checkpoint was: weights, optimizer, schedule, scaler, RNG and data position."""
    with torch.no_grad():
        for param, saved in zip(s.params, state["trainable"], strict=True):
            param.copy_(saved)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    s.meter.load_state_dict(state["meter"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and s.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for _ in range(state["step"]):  # each epoch's order follows from the seed: skip what was trained on
        next(s.batches)
    return checkpoints.Resumed(state["step"], state["samples"], state["tokens"], state["wall_time"])


def recorded_history(db_path: Path, run_id: int, upto: int) -> History:
    """The rows and evals a run recorded up to step `upto`, for the analysis of a resumed run."""
    history = History()
    columns = ", ".join(("step", *STEP_COLUMNS))
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
        rows = conn.execute(
            f"SELECT {columns} FROM step_metrics WHERE run_id = ? AND step <= ? ORDER BY step", (run_id, upto)
        ).fetchall()
        evals = conn.execute(
            "SELECT step, eval_loss, wall_time FROM eval_metrics WHERE run_id = ? AND step <= ? ORDER BY step",
            (run_id, upto),
        ).fetchall()
    history.extend(rows, evals)
    return history


def _recorded(recorder: Any, run_id: int, upto: int) -> History:
    """A resumed run's history, from the database or, for a job recording over HTTP, from the server."""
    if not hasattr(recorder, "recorded"):
        return recorded_history(recorder.db_path, run_id, upto)
    history = History()
    history.extend(*recorder.recorded(upto))
    return history


def save_adapter(s: Setup, run_dir: Path) -> Path:
    target = run_dir / "adapter"
    s.model.save_pretrained(target)
    return target


def _adapter_files(adapter: Path | None, run_dir: Path) -> list[str]:
    if adapter is None:
        return []
    return [p.relative_to(run_dir).as_posix() for p in sorted(adapter.iterdir()) if p.is_file()]


def _walk_files(run_dir: Path) -> list[str]:
    """The map's snapshots, where the run keeps them."""
    return [SNAPSHOTS_FILE] if (run_dir / SNAPSHOTS_FILE).exists() else []


# --- a whole run ---------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, run_id: int, home: Path, recorder: Recorder, stop: StopFlag, progress: Any = None
) -> Outcome:
    """Set up, mark the run running, fit, save the adapter, and record how it ended."""
    try:
        s = setup(cfg, home)
        # A resumed run is this process's now: its pid and start time, and no end yet.
        me = os.getpid()
        recorder.update_run(
            status=RunStatus.running, started_at=utcnow(), pid=me, pid_start=process_start_time(me),
            finished_at=None, error=None, **s.plan,
        )  # fmt: skip
        log.info(
            "run %d: %d training examples, batch %d x %d accumulation -> %d updates per epoch, %d optimizer steps; "
            "%d trainable of %d parameters on %s",
            run_id, s.plan["n_train"], cfg.batch_size, cfg.grad_accum_steps, s.updates_per_epoch, s.total_steps,
            s.plan["trainable_params"], s.plan["total_params"], s.device,
        )  # fmt: skip
        if progress is not None:
            progress.reset(total=s.total_steps)
        run_dir = home / "runs" / str(run_id)
        recorder.fetch_checkpoint(run_dir)
        found = checkpoints.latest(run_dir)
        resume = checkpoints.load(found) if found is not None else None
        history = _recorded(recorder, run_id, resume["step"]) if resume else History()
        if resume is not None:
            log.info("run %d: resuming after step %d from %s", run_id, resume["step"], found)
        if progress is not None and resume is not None:
            progress.update(resume["step"])
        outcome = fit(s, recorder, stop, progress, history, run_dir=run_dir, resume=resume)
        adapter = save_adapter(s, run_dir) if outcome.status != "diverged" else None
        s.walk.save(run_dir)
        recorder.files(run_dir, [*_adapter_files(adapter, run_dir), *_walk_files(run_dir)])
        summary = history.summary(outcome.status, cfg.kind)
        if outcome.error:  # the trainer saw what went wrong; the stored rows hold no NaN to show it
            summary["reason"] = f"The run diverged: {outcome.error}."
    except Exception as exc:
        recorder.update_run(status=RunStatus.failed, error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
        raise
    recorder.update_run(
        status=RunStatus(outcome.status),
        error=outcome.error,
        error_step=outcome.error_step,
        finished_at=utcnow(),
        summary=summary,
        verdict=summary.get("verdict"),
    )
    return outcome
