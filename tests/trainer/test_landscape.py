"""Issue 13 in the engine: cross-sections of steps on a quadratic with a known answer, per-tensor norms against
norms taken independently, LoRA+'s two rates, and the weight snapshots the map is made of."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.landscape import best_alpha, read_stride
from trainer.landscape import PROBE_ALPHAS, Snapshots, line_losses, snapshot_steps
from trainer.measure import StepMeter

TINY_LAYERS = 2


def sgd_step_probe(h: torch.Tensor, lr: float) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One plain SGD step on L(θ) = Σ h θ² / 2 from a fixed θ; (best α of its probe, θ after, θ after the probe,
    the gradient)."""
    theta = torch.nn.Parameter(torch.linspace(-1.0, 2.0, len(h)))
    meter, optimizer = StepMeter([theta]), torch.optim.SGD([theta], lr=lr)
    (h * theta**2 / 2).sum().backward()
    grad = theta.grad.detach().clone()
    meter.before_step()
    optimizer.step()
    meter.after_step()
    after = theta.detach().clone()
    losses = line_losses(meter.weights, meter.last_update(), lambda: (h * theta.detach() ** 2 / 2).sum())
    return best_alpha(PROBE_ALPHAS, losses.tolist()), after, theta.detach().clone(), grad  # type: ignore[return-value]


@pytest.mark.parametrize("lr_h", [0.4, 1.0, 2.5])
def test_best_alpha_of_plain_sgd_on_a_quadratic_is_one_over_lr_h(lr_h: float) -> None:
    # Along the step Δθ = -lr h θ the loss is h|θ|²(1 - α lr h)² / 2: lowest at α = 1 / (lr h).
    h = torch.full((5,), 2.0)
    best, after, restored, _ = sgd_step_probe(h, lr=lr_h / 2.0)
    assert best == pytest.approx(1 / lr_h, rel=1e-4)
    assert torch.equal(after, restored)  # the probe puts the weights back bit for bit


def test_best_alpha_on_an_anisotropic_quadratic_is_the_exact_line_minimum() -> None:
    # With curvatures h_i the lowest point along -lr g is at α = gᵀg / (lr gᵀHg).
    h, lr = torch.tensor([1.0, 4.0, 10.0, 0.5]), 0.15
    best, _, _, grad = sgd_step_probe(h, lr)
    expected = float((grad @ grad) / (lr * (grad * h) @ grad))
    assert best == pytest.approx(expected, rel=1e-4)
    assert 0 < expected < 1  # this stride overshoots: the reading says by how much
    assert f"{1 / expected:.2g}x too long" in read_stride(best)


def test_a_flat_or_broken_probe_has_no_lowest_point() -> None:
    assert best_alpha(PROBE_ALPHAS, [1.0] * len(PROBE_ALPHAS)) is None  # an fp16 step the scaler skipped
    assert best_alpha(PROBE_ALPHAS, [1.0, None, *[1.0] * 7]) is None
    assert best_alpha(PROBE_ALPHAS, [9, 8, 7, 6, 5, 4, 3, 2, 1]) == 3.0  # still falling at the end
    assert "the stride was at least 3x too short" in read_stride(3.0)


def test_tensor_norms_are_each_tensors_own_update_and_weight_norm() -> None:
    torch.manual_seed(0)
    shapes = [torch.randn(3, 4), torch.randn(7), torch.zeros(2)]
    params = [torch.nn.Parameter(t) for t in shapes]
    meter, optimizer = StepMeter(params), torch.optim.AdamW(params, lr=0.01)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        sum((p**2).sum() * (i + 1) for i, p in enumerate(params)).backward()
        meter.before_step()
        optimizer.step()
        meter.after_step()
        norms = meter.tensor_norms()
        assert norms[0].tolist() == pytest.approx(
            [(p.detach() - b).norm().item() for p, b in zip(params, before, strict=True)]
        )
        assert norms[1].tolist() == pytest.approx([p.detach().norm().item() for p in params])


def run_rows(home: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with sqlite3.connect(home / "stepscope.db") as conn:
        return conn.execute(sql).fetchall()


def test_a_run_records_probes_module_norms_and_snapshots(trained, home: Path) -> None:
    code, run, steps = trained(
        "--max-steps", "12", "--probe-every", "1", "--module-norms-every", "5", "--map-snapshots", "4",
        "--learning-rate", "0.01",
    )  # fmt: skip
    assert code == 0 and run["status"] == "completed"
    probes = run_rows(home, "SELECT step, alphas, losses, best_alpha FROM probe_curves ORDER BY step")
    assert [p[0] for p in probes] == list(range(1, 13))
    alphas = json.loads(probes[0][1])
    at_0, at_1 = alphas.index(0.0), alphas.index(1.0)
    for (_, _, before, _), (_, _, after, _) in zip(probes, probes[1:], strict=False):
        # where one step landed is where the next started: the same weights, the same probe batch
        assert json.loads(after)[at_0] == pytest.approx(json.loads(before)[at_1], rel=1e-5)
    assert all(p[3] is not None for p in probes)

    # module norms at step 1, every 5 steps and at the last: one per trainable tensor, A and B of each module
    names = json.loads(run["lora_tensors"])
    assert names[:2] == ["layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_B"]
    assert len(names) == len(set(names)) == 2 * 4 * TINY_LAYERS  # A and B of q, k, v, o in every layer
    norms = run_rows(home, "SELECT step, update_norms, param_norms FROM module_norms ORDER BY step")
    assert [n[0] for n in norms] == [1, 5, 10, 12]
    by_step = {s["step"]: s for s in steps}
    for step, updates, weights in norms:
        u, w = json.loads(updates), json.loads(weights)
        assert len(u) == len(w) == len(names)
        # each tensor's norms add up (in squares) to the whole update and weight norm of the step's row
        assert sum(x * x for x in u) ** 0.5 == pytest.approx(by_step[step]["update_norm"], rel=1e-5)
        assert sum(x * x for x in w) ** 0.5 == pytest.approx(by_step[step]["param_norm"], rel=1e-5)
    # LoRA's B starts at zero, so at step 1 only the Bs move (A's gradient is B-weighted)
    first = json.loads(norms[0][1])
    assert all(v == 0 for v in first[0::2]) and all(v > 0 for v in first[1::2])
    # and the last step's weight norms are the saved adapter's, taken independently from its file
    adapter = load_file(home / "runs" / str(run["id"]) / "adapter" / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model.model.").removesuffix(".weight"): v for k, v in adapter.items()}
    assert json.loads(norms[-1][2]) == pytest.approx([saved[n].norm().item() for n in names], rel=1e-5)

    snaps = Snapshots.load(home / "runs" / str(run["id"]))
    assert snaps is not None and snaps.names == names
    assert snaps.steps == sorted(snapshot_steps(4, 12)) == [3, 6, 9, 12]
    steps_kept, points = snaps.points()
    assert steps_kept[0] == 0 and points[0].abs().max() == 0  # the start, then displacements from it
    final = torch.cat([saved[n].reshape(-1) for n in names])
    assert (snaps.start + points[-1]).allclose(final, atol=1e-3)  # fp16 displacements: within their rounding


def test_loraplus_records_each_group_rate_and_their_ratio_is_the_setting(trained, home: Path) -> None:
    code, run, steps = trained(
        "--max-steps", "8", "--loraplus-lr-ratio", "16", "--scheduler", "cosine", "--warmup-steps", "3",
        "--learning-rate", "0.001",
    )  # fmt: skip
    assert code == 0
    rates = run_rows(home, "SELECT key, step, value FROM scalar_metrics ORDER BY step, key")
    a = {s: v for k, s, v in rates if k == "lr/A"}
    b = {s: v for k, s, v in rates if k == "lr/B"}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert {s["step"]: s["lr"] for s in steps} == pytest.approx(a)  # the lr column is A's rate
    assert len({round(v, 12) for v in a.values()}) > 3  # the schedule moved both rates ...
    assert all(b[s] == pytest.approx(16 * a[s]) for s in a if a[s] > 0)  # ... keeping B at 16x A's


def test_loraplus_ratio_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.trainer.conftest import train

    with pytest.raises(SystemExit) as exited:
        train("--loraplus-lr-ratio", "-2")
    assert exited.value.code == 2
    assert "--loraplus-lr-ratio: must be a finite number > 0" in capsys.readouterr().err
