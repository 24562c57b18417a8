"""Issue 9's measurements and rules on problems with known answers: the cosines of a quadratic, token-weighted
accumulation, a divergence guard that only fires on divergence, and fp16 overflow steps that are skipped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import make_config
from trainer.loop import FP16_MAX_SKIPS_IN_A_ROW, DivergenceGuard, _Copy, forward_backward, setup
from trainer.measure import StepMeter


def quadratic_cosines(lr: float, h: float = 2.0, steps: int = 6) -> list[tuple[float, float]]:
    """Plain SGD on L(θ) = h θ² / 2 from θ = 1: (update_cos, grad_alignment) per step, from StepMeter."""
    theta = torch.nn.Parameter(torch.ones(1))
    meter, optimizer = StepMeter([theta]), torch.optim.SGD([theta], lr=lr)
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        (h * theta**2 / 2).sum().backward()
        _, alignment = meter.before_step()
        optimizer.step()
        _, _, update_cos = meter.after_step()
        out.append((update_cos.item(), alignment.item()))
    return out


def test_sgd_on_a_quadratic_bounces_between_1_and_2_over_h_and_creeps_below_1_over_h() -> None:
    # θ_{t+1} = (1 - lr h) θ_t: for 1/h < lr < 2/h the factor is in (-1, 0), so θ changes sign every step
    # while it shrinks (the walk bounces across the minimum and converges); below 1/h it keeps its sign.
    bouncing = quadratic_cosines(lr=0.8)  # 1 - 0.8 * 2 = -0.6
    creeping = quadratic_cosines(lr=0.2)  # 1 - 0.2 * 2 = 0.6
    assert all(math.isnan(v) for v in bouncing[0])  # no previous update at the first step
    assert [c for c, _ in bouncing[1:]] == pytest.approx([-1.0] * 5)
    assert [a for _, a in bouncing[1:]] == pytest.approx([-1.0] * 5)
    assert [c for c, _ in creeping[1:]] == pytest.approx([1.0] * 5)
    assert [a for _, a in creeping[1:]] == pytest.approx([1.0] * 5)


def test_the_alignment_is_the_cosine_of_the_new_gradient_with_the_last_step_undone() -> None:
    # Two parameters so that the cosine is not just a sign: an anisotropic quadratic h = (1, 10), lr 0.15.
    h = torch.tensor([1.0, 10.0])
    theta = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    meter, optimizer = StepMeter([theta]), torch.optim.SGD([theta], lr=0.15)
    previous = None
    for step in range(4):
        optimizer.zero_grad()
        (h * theta**2 / 2).sum().backward()
        grad, before = theta.grad.clone(), theta.detach().clone()
        grad_norm, alignment = meter.before_step()
        optimizer.step()
        update_norm, _, update_cos = meter.after_step()
        update = theta.detach() - before
        assert grad_norm.item() == pytest.approx(grad.norm().item())
        assert update_norm.item() == pytest.approx(update.norm().item())
        if step:
            assert alignment.item() == pytest.approx(torch.cosine_similarity(grad, -previous, dim=0).item())
            assert update_cos.item() == pytest.approx(torch.cosine_similarity(update, previous, dim=0).item())
        previous = update


def _tiny(home: Path, **fields: object):  # type: ignore[no-untyped-def]
    cfg = make_config({"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "seed": 0, **fields})
    return setup(cfg, home)


def test_accumulated_micro_batches_give_the_loss_and_gradient_of_one_batch(home: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        s = _tiny(home, batch_size=batch, grad_accum_steps=accum)
        micro = next(s.batches)
        loss = forward_backward(s, micro, scaler)
        grad_norm, _ = s.meter.before_step()
        results.append((loss.item(), grad_norm.item(), [b.n_loss_tokens for b in micro]))
    (loss_1, grad_1, tokens_1), (loss_2, grad_2, tokens_2) = results
    assert sum(tokens_1) == sum(tokens_2) and tokens_2[0] != tokens_2[1]  # unequal halves: weighting matters
    assert loss_2 == pytest.approx(loss_1, rel=1e-5) and grad_2 == pytest.approx(grad_1, rel=1e-5)


def test_a_run_near_zero_loss_that_meets_one_noisy_batch_is_not_diverged() -> None:
    guard = DivergenceGuard()
    losses = [3.0 * math.exp(-t / 20) + 0.005 for t in range(200)] + [2.5] + [0.01] * 20
    assert all(guard.check(t, loss, 1.0) is None for t, loss in enumerate(losses, 1))


def test_a_loss_far_above_its_start_or_not_finite_is_diverged() -> None:
    guard = DivergenceGuard()
    reasons = [guard.check(t, 3.0 + t, 1.0) for t in range(1, 40)]
    first = next(i for i, r in enumerate(reasons) if r)
    assert "4× where the run started (4)" in reasons[first]  # the EMA passed 16 once the losses had climbed
    assert DivergenceGuard().check(1, None, 1.0) == "loss became non-finite at step 1"


def test_fp16_overflow_steps_are_recorded_as_skipped_and_only_a_run_of_them_ends_the_run() -> None:
    # One step's device values as the loop copies them: loss, grad_norm (inf: overflow), update_norm 0, ...
    values = torch.tensor([[2.0, math.inf, 0.0, 3.0, math.nan, math.nan], [2.0, 1.5, 0.01, 3.0, 0.2, -0.1]])
    host = [(1, 0.1, 8, 80, 1e-3, 0.1, 0.1), (2, 0.2, 16, 160, 1e-3, 0.2, 0.1)]
    rows, _ = _Copy(host, [], values, None, None, scaled=True).rows()
    assert [r[15] for r in rows] == [1, 0]  # skipped flag
    assert rows[0][6] is None and rows[0][7] == 0.0 and rows[1][13] == pytest.approx(0.2)
    guard = DivergenceGuard()
    for step in range(1, FP16_MAX_SKIPS_IN_A_ROW):
        assert guard.check(step, 2.0, None, skipped=True) is None
    assert guard.check(FP16_MAX_SKIPS_IN_A_ROW, 2.0, 1.0) is None  # a good step resets the count
    for step in range(FP16_MAX_SKIPS_IN_A_ROW + 1, 2 * FP16_MAX_SKIPS_IN_A_ROW):
        assert guard.check(step, 2.0, None, skipped=True) is None
    assert "loss scale underflowed" in (guard.check(99, 2.0, None, skipped=True) or "")
    # Without loss scaling a non-finite gradient norm is no skipped step: it is divergence.
    unscaled, _ = _Copy(host[:1], [], values[:1], None, None, scaled=False).rows()
    assert unscaled[0][15] == 0 and "gradient norm" in (DivergenceGuard().check(1, 2.0, None) or "")
