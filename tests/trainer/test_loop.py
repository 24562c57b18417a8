"""What the loop records per optimizer step, checked against independent computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from trainer.config import make_config
from trainer.loop import forward_backward, setup

PLAIN_SGD = ["--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--max-grad-norm", "0"]


def test_plain_sgd_update_is_exactly_lr_times_grad(trained) -> None:
    code, run, rows = trained(*PLAIN_SGD, "--learning-rate", "0.5", "--max-steps", "25", "--batch-size", "16")
    assert code == 0 and run["status"] == "completed"
    assert len(rows) == 25
    for r in rows:
        assert r["grad_norm"] > 0
        expected = r["lr"] * r["grad_norm"]
        assert r["update_norm"] == pytest.approx(expected, rel=1e-5), f"step {r['step']}"
        assert r["step_scale"] == pytest.approx(1.0, rel=1e-5)
        assert r["update_ratio"] == pytest.approx(r["update_norm"] / r["param_norm"], rel=1e-9)


def test_adamw_update_is_not_lr_times_grad(trained) -> None:
    _, _, rows = trained("--optimizer", "adamw", "--learning-rate", "1e-3", "--max-steps", "10", "--max-grad-norm", "0")
    scales = [r["step_scale"] for r in rows]
    # Adam normalises each coordinate by its gradient's running RMS, so the step is far from lr·grad.
    assert all(abs(s - 1) > 0.5 for s in scales), scales


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "constant_with_warmup"])
def test_recorded_lr_follows_transformers_schedule(trained, scheduler: str) -> None:
    total, warmup, peak = 12, 4, 0.01
    _, _, rows = trained(
        "--scheduler", scheduler, "--warmup-steps", str(warmup), "--learning-rate", str(peak), "--max-steps", str(total)
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if scheduler != "constant":
        assert rows[0]["lr"] == 0.0 and rows[warmup]["lr"] == pytest.approx(peak)


def test_grad_norm_matches_clip_grad_norm(trained, home: Path) -> None:
    flags = ["--optimizer", "sgd", "--learning-rate", "0.3", "--max-grad-norm", "0.5", "--max-steps", "6"]
    _, _, rows = trained(*flags)
    # Replay the same steps with a plain loop and torch's own clip_grad_norm_.
    cfg = make_config({"model": "tiny-random-llama", "optimizer": "sgd", "learning_rate": 0.3,
                       "max_grad_norm": 0.5, "max_steps": 6})  # fmt: skip
    s = setup(cfg, home)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for r in rows:
        forward_backward(s, next(s.batches), scaler)
        norm = torch.nn.utils.clip_grad_norm_(s.params, 0.5)
        s.optimizer.step()
        s.optimizer.zero_grad()
        assert r["grad_norm"] == pytest.approx(norm.item(), rel=1e-5), f"step {r['step']}"
        # Clipping scales the update to max_grad_norm: step_scale is the clip factor.
        assert r["step_scale"] == pytest.approx(min(1.0, 0.5 / norm.item()), rel=1e-4)


@pytest.mark.parametrize(("accum", "per_epoch"), [(1, 10), (2, 5)])
def test_updates_per_epoch_follow_batch_size(trained, accum: int, per_epoch: int) -> None:
    code, run, rows = trained("--batch-size", "100", "--grad-accum-steps", str(accum), "--epochs", "1",
                              "--max-seq-len", "16", "--eval-every", "0")  # fmt: skip
    assert code == 0
    assert run["n_train"] == 1000 and run["updates_per_epoch"] == per_epoch and run["total_steps"] == per_epoch
    assert [r["step"] for r in rows] == list(range(1, per_epoch + 1))
    assert rows[-1]["samples"] == 1000 and rows[-1]["epoch"] == pytest.approx(1.0)
    assert rows[0]["samples"] == 100 * accum


def test_max_steps_overrides_epochs_and_cycles_the_data(trained) -> None:
    _, run, rows = trained("--batch-size", "100", "--epochs", "1", "--max-steps", "25", "--max-seq-len", "16")
    assert len(rows) == 25 and run["total_steps"] == 25
    assert rows[-1]["epoch"] == pytest.approx(2.5) and rows[-1]["samples"] == 2500


def test_same_seed_same_losses(trained) -> None:
    flags = ["--max-steps", "8", "--seed", "7", "--lora-dropout", "0.1"]
    _, _, first = trained(*flags)
    _, _, second = trained(*flags)
    _, _, other = trained("--max-steps", "8", "--seed", "8", "--lora-dropout", "0.1")
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert [r["loss"] for r in first] != [r["loss"] for r in other]


def test_nan_gives_diverged_and_keeps_rows(trained, home: Path) -> None:
    # An absurd SGD step sends the weights to inf within a few steps, and the loss to NaN.
    code, run, rows = trained(*PLAIN_SGD, "--learning-rate", "1e30", "--max-steps", "50")
    assert code == 2
    assert run["status"] == "diverged"
    assert run["error_step"] == rows[-1]["step"] < 50
    assert "non-finite" in run["error"]
    assert rows[0]["loss"] is not None and math.isfinite(rows[0]["loss"])
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert run["finished_at"] is not None
    assert not (home / "runs" / str(run["id"]) / "adapter").exists()


def test_completed_run_saves_adapter_and_eval_loss(trained, home: Path) -> None:
    import sqlite3

    code, run, rows = trained("--max-steps", "10", "--eval-every", "4", "--learning-rate", "1e-2")
    assert code == 0 and run["status"] == "completed"
    adapter = home / "runs" / str(run["id"]) / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    with sqlite3.connect(home / "stepscope.db") as conn:
        evals = conn.execute("SELECT step, eval_loss FROM eval_metrics ORDER BY step").fetchall()
    assert [s for s, _ in evals] == [4, 8, 10]
    assert all(math.isfinite(v) for _, v in evals)
    assert run["last_loss"] == rows[-1]["loss"] and run["best_loss"] == min(r["loss"] for r in rows)
    assert run["trainable_params"] > 0 and run["trainable_params"] < run["total_params"]
    assert rows[-1]["loss"] < rows[0]["loss"]  # the synthetic data has a learnable signal


def test_lr_range_test_grows_lr_exponentially(trained) -> None:
    code, run, rows = trained("--kind", "lr_range_test", "--range-min-lr", "1e-5", "--range-max-lr", "10",
                              "--max-steps", "31", "--optimizer", "sgd")  # fmt: skip
    assert code == 0 and run["status"] == "completed"
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert ratios == pytest.approx([10 ** (6 / 30)] * len(ratios), rel=1e-9)
    summary = json.loads(run["summary"])
    assert run["verdict"] is None and summary["verdict"] is None  # a verdict judges one constant rate
    suggestion = summary["range_test"]
    assert 1e-5 <= suggestion["suggested_lr"] <= 10
    assert len(suggestion["sweep_lrs"]) == 5


def test_run_ends_with_analysis_summary(trained) -> None:
    _, run, rows = trained("--max-steps", "40", "--learning-rate", "1e-2")
    summary = json.loads(run["summary"])
    assert summary["n_steps"] == 40
    assert summary["best_loss"] <= summary["initial_loss"]
    assert run["verdict"] == summary["verdict"] in ("ok", "too_low", "too_high")
    assert summary["reason"]
