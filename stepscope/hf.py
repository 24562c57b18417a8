"""`StepscopeCallback`: every optimizer step of a Hugging Face `Trainer` (and so TRL's) into stepscope.

    from stepscope.hf import StepscopeCallback
    trainer = Trainer(..., callbacks=[StepscopeCallback(name="my run")])

Per optimizer step: the loss, the lr of each param group (`lr`, and `lr_group_1`, ... when there are
several), the gradient norm before clipping, the update norm `‖θ_after − θ_before‖`, the parameter norm,
update ratio, step scale, `update_cos` and `grad_alignment` of the trainable parameters, measured like
stepscope's own engine (`trainer.measure.StepMeter`): on the device, into a device buffer that reaches
the host in batches (every 32 steps or 0.5 s), so the training loop never waits for the GPU. Plus the
Trainer's eval metrics. Only the main process (`state.is_world_process_zero`) measures and sends.

On gradient clipping. The Trainer clips *before* `on_pre_optimizer_step`, so the gradients a callback sees
there are already clipped, and the pre-clip norm it computes is not passed to callbacks. So when
`max_grad_norm > 0` this callback takes clipping over: at `on_train_begin` it sets the Trainer's
`max_grad_norm` to 0 (restored at `on_train_end`), and in `on_pre_optimizer_step` it measures the
gradients and then clips them exactly as `torch.nn.utils.clip_grad_norm_` does (scale by
`max_norm / (norm + 1e-6)` when that is below 1) before the optimizer steps. The recorded `grad_norm` is
therefore the pre-clip norm, the same number the Trainer logs as `grad_norm` (with `max_grad_norm = 0` it
computes the norm without clipping). Not for DeepSpeed or FSDP, which clip inside their engines.

The loss is the model's own `outputs.loss` of the step's micro-batches, caught by a forward hook in
training mode: their sum when the Trainer passes `num_items_in_batch` (the loss is then normalised over
the whole step), else their mean, as the Trainer itself accumulates it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

import stepscope
from trainer.measure import StepMeter

FLUSH_STEPS = 32
FLUSH_SECONDS = 0.5
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s
DEVICE_COLUMNS = ("loss", "grad_norm", "grad_alignment", "update_norm", "param_norm", "update_cos")


class StepscopeCallback(TrainerCallback):
    """Records every optimizer step into a stepscope server (arguments as `stepscope.init`'s); or give `run`."""

    def __init__(
        self,
        server: str | None = None,
        name: str = "",
        config: dict[str, Any] | None = None,
        token: str | None = None,
        run: stepscope.Run | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.server, self.name, self.config, self.token = server, name, config or {}, token
        self.init_kwargs = init_kwargs
        self.run = run
        self.meter: StepMeter | None = None
        self._max_grad_norm = 0.0
        self._hook: Any = None
        self._args: Any = None

    # --- life cycle ---

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        if self.run is None:
            config = {**_plain(args.to_dict()), **self.config}
            self.run = stepscope.init(
                self.server, self.name or args.run_name or "", config, self.token,
                source="hf-trainer", learning_rate=args.learning_rate, **self.init_kwargs,
            )  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        self.meter = StepMeter(params)
        device = params[0].device if params else torch.device("cpu")
        self._values = torch.zeros((FLUSH_STEPS, len(DEVICE_COLUMNS)), device=device)
        self._loss = torch.zeros((), device=device)
        self._micro = 0
        self._host: list[dict[str, Any]] = []
        self._in_flight: list[tuple[list[dict[str, Any]], torch.Tensor, Any]] = []
        self._last_copy = self._started = time.monotonic()
        self._step_started = self._started
        self._args, self._max_grad_norm = args, float(args.max_grad_norm or 0)
        if self._max_grad_norm > 0:
            args.max_grad_norm = 0.0  # see the module's docstring: the pre-clip norm, then our clipping
        self._hook = model.register_forward_hook(self._catch_loss, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter is None:
            return
        self._flush(wait=True)
        if self._hook is not None:
            self._hook.remove()
        if self._max_grad_norm > 0:
            args.max_grad_norm = self._max_grad_norm
        assert self.run is not None
        self.run.finish("completed")
        self.meter = None

    # --- each step ---

    def _catch_loss(self, module: Any, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if module.training and isinstance(loss, torch.Tensor):
            self._loss += loss.detach().float()
            self._micro += 1
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter is not None:
            self._loss.zero_()
            self._micro = 0
            self._step_started = time.monotonic()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter is None:
            return
        self._grad_norm, self._alignment = self.meter.before_step()
        if self._max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_, on the norm just measured
            scale = torch.clamp(self._max_grad_norm / (self._grad_norm + CLIP_EPS), max=1.0)
            grads = [p.grad for p in self.meter.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.meter is None:
            return
        update_norm, param_norm, update_cos = self.meter.after_step()
        mean = self._loss if getattr(self, "_summed", False) else self._loss / max(1, self._micro)
        n = len(self._host)
        self._values[n] = torch.stack([mean, self._grad_norm, self._alignment, update_norm, param_norm, update_cos])
        now = time.monotonic()
        row: dict[str, Any] = {
            "step": state.global_step + 1,  # the Trainer counts the step after this event
            "wall_time": now - self._started,
            "step_time": now - self._step_started,
        }
        groups = optimizer.param_groups if optimizer is not None else []
        for i, group in enumerate(groups):  # plain floats on the host: reading them costs no sync
            row["lr" if i == 0 else f"lr_group_{i}"] = float(group["lr"])
        self._host.append(row)
        if len(self._host) >= FLUSH_STEPS or now - self._last_copy >= FLUSH_SECONDS:
            self._start_copy()
        self._flush(wait=False)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.meter is not None and self.run is not None and metrics:
            self.run.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step=state.global_step)

    # --- device rows to the host, in batches ---

    def _start_copy(self) -> None:
        """Queue the copy of the buffered rows; a CUDA event says when it landed (no wait here)."""
        if not self._host:
            return
        values = self._values[: len(self._host)]
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = values.clone()
        self._in_flight.append((self._host, host, event))
        self._host, self._last_copy = [], time.monotonic()

    def _flush(self, wait: bool) -> None:
        if wait:
            self._start_copy()
        assert self.run is not None
        while self._in_flight and (wait or self._in_flight[0][2] is None or self._in_flight[0][2].query()):
            rows, host, event = self._in_flight.pop(0)
            if event is not None:
                event.synchronize()
            for row, values in zip(rows, host.tolist(), strict=True):
                measured = dict(zip(DEVICE_COLUMNS, values, strict=True))
                lr, grad, update = row.get("lr"), measured["grad_norm"], measured["update_norm"]
                measured["update_ratio"] = update / measured["param_norm"] if measured["param_norm"] else None
                measured["step_scale"] = update / (lr * grad) if lr and grad else None
                self.run.log({**row, **measured}, step=row["step"])


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments as JSON-able hyperparameters (enums and paths as text)."""
    return {k: v if v is None or isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}
