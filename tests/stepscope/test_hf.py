"""StepscopeCallback in a real transformers.Trainer on the tiny model, recording into a real server."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from stepscope.hf import StepscopeCallback
from tests.stepscope.conftest import Server
from trainer.config import TrainConfig
from trainer.models import add_lora, load_base


class UpdateNorms(TrainerCallback):
    """‖θ_after − θ_before‖ of the trainable parameters, taken independently of the callback under test."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.before = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.norms.append(math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in self.before)))


def test_the_callback_records_every_step_as_the_trainer_logs_it(server: Server, tmp_path: Path) -> None:
    model, tok = load_base("tiny-random-llama", tmp_path / "models")
    model = add_lora(model, TrainConfig(model="tiny-random-llama"))
    ids = torch.randint(3, len(tok), (48, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4, learning_rate=5e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=8, max_grad_norm=1.0,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callback, independent = StepscopeCallback(server.url, name="hf", spool_dir=tmp_path / "spool"), UpdateNorms()
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback, independent]
    )
    trainer.train()
    assert args.max_grad_norm == 1.0  # given back

    assert callback.run is not None and callback.run.id is not None
    run = server.get(f"/api/runs/{callback.run.id}")
    assert (run["status"], run["kind"], run["steps_done"]) == ("completed", "external", 12)
    assert run["summary"]["n_steps"] == 12 and run["last_eval_loss"] is not None
    keys = "loss,lr,grad_norm,update_norm,param_norm,update_ratio,step_scale,grad_alignment,eval_loss"
    got = server.get(f"/api/runs/{callback.run.id}/metrics?keys={keys}")
    series = got["series"]
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert got["steps"] == list(range(1, 13)) and len(logged) == 12
    assert series["grad_norm"] == pytest.approx([h["grad_norm"] for h in logged], rel=1e-4)
    assert max(h["grad_norm"] for h in logged) > 1.0, "clipping never happened: the test shows nothing"
    assert series["loss"] == pytest.approx([h["loss"] for h in logged], rel=1e-4)
    assert series["lr"] == pytest.approx([h["learning_rate"] for h in logged], rel=1e-6)
    assert series["update_norm"] == pytest.approx(independent.norms, rel=1e-3)
    assert all(v is not None for v in series["param_norm"] + series["step_scale"] + series["grad_alignment"][1:])
    assert [v for v in series["eval_loss"] if v is not None]
    assert "eval_runtime" in server.get(f"/api/runs/{callback.run.id}/metric-keys")["custom"]
