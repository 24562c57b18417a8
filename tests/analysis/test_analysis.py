"""The analysis scores and verdicts on synthetic curves whose answers are known by hand."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.range_test import RangeTestStop, _valley_index, lr_range_suggestions, sweep_lrs
from analysis.runs import DIVERGED_LOSS_FACTOR, SPIKE_MIN_HISTORY, spike_steps, summarize_run
from analysis.smoothing import DebiasedEma, ema_smooth
from analysis.sweeps import summarize_sweep

N = 1000
STEPS = list(range(N))
# loss(t) = 1 + 3 e^(-t/100): converged by the end (e^-9.99 = 4.6e-5).
EXP_DECAY = [1 + 3 * math.exp(-t / 100) for t in STEPS]


def _run(losses: list[float], update_ratio: float = 1e-3, status: str | None = None, **extra: list[float]) -> dict:
    series = {"loss": losses, "update_ratio": [update_ratio] * len(losses), **extra}
    summary = summarize_run(list(range(len(losses))), series, status=status)
    json.dumps(summary, allow_nan=False)  # JSON-serialisable, no NaN or inf
    return summary


# --- smoothing -----------------------------------------------------------------------------------


def test_ema_smooth_matches_hand_computation() -> None:
    # w = 0.5: last = 0.5 -> /0.5 = 1; last = 0.25 + 1 = 1.25 -> /0.75 = 5/3;
    # last = 0.625 + 1.5 = 2.125 -> /0.875 = 17/7.
    assert ema_smooth([1.0, 2.0, 3.0], weight=0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])


def test_ema_smooth_passes_non_finite_through_without_polluting_the_state() -> None:
    # The NaN and the None are skipped: the 3 is the second accumulated value,
    # last = 0.25 + 1.5 = 1.75, debiased by 1 - 0.5^2 -> 7/3.
    out = ema_smooth([1.0, math.nan, None, 3.0, math.inf], weight=0.5)
    assert out[0] == 1.0
    assert math.isnan(out[1]) and math.isnan(out[2])
    assert out[3] == pytest.approx(7 / 3)
    assert out[4] == math.inf


def test_ema_smooth_returns_a_constant_series_unchanged_and_rejects_bad_weights() -> None:
    assert ema_smooth([0.3] * 50) == [0.3] * 50
    assert ema_smooth([]) == []
    with pytest.raises(ValueError):
        ema_smooth([1.0, 2.0], weight=1.0)


def test_debiased_ema_streams_the_same_values() -> None:
    values = [2.0, 1.5, math.nan, 1.2, 0.9]
    ema = DebiasedEma(0.6)
    streamed = [ema.update(v) for v in values]
    expected = ema_smooth(values, 0.6)
    assert streamed[2] != streamed[2]  # NaN passed through
    assert [v for i, v in enumerate(streamed) if i != 2] == pytest.approx([v for i, v in enumerate(expected) if i != 2])


# --- per-run verdicts ----------------------------------------------------------------------------------


def test_smooth_exponential_decay_is_ok_with_the_analytic_scores() -> None:
    s = _run(EXP_DECAY)
    assert s["verdict"] == "ok"
    assert s["sign_change_rate"] == 0.0
    assert s["rise_fraction"] == 0.0
    assert s["tv_ratio"] == pytest.approx(1.0, abs=1e-3)
    # t90 by hand. The EMA (w = 0.6) of 3e^(-kt), k = 0.01, settles at 3e^(-kt) * c with
    # c = (1 - w) / (1 - w e^k) = 0.4 / (1 - 0.6 * 1.010050) = 1.01531, i.e. it lags ~1.5 steps.
    # Start 4, end ~1.000140, so 90% of the drop is reached at 4 - 0.9 * 2.99986 = 1.300125:
    # 3 c e^(-t/100) <= 0.300125  ->  t >= 100 ln(3 c / 0.300125) = 100 (2.30225 + 0.01519) = 231.7.
    assert s["t90"] == 232
    # Normalised area of e^(-kt) over T = 999 steps: (1 - e^-9.99) / (k T) = 0.1001, plus the lag's
    # 1.5 steps of the full height (1.5 / 999 = 0.0015).
    assert s["auc_norm"] == pytest.approx(0.1016, abs=0.001)
    assert s["final_loss"] == pytest.approx(1.0, abs=1e-3)
    assert s["best_loss"] == s["final_loss"] and s["best_step"] == N - 1
    assert s["initial_loss"] == 4.0
    assert s["spike_count"] == 0 and s["grad_spike_count"] == 0
    assert s["median_update_ratio"] == 1e-3
    assert s["last_quarter_drop_frac"] < 0.01
    assert "232" in s["reason"] and "1.0e-03" in s["reason"]


def test_large_alternating_noise_is_too_high() -> None:
    losses = [v + 0.5 * (-1) ** t for t, v in enumerate(EXP_DECAY)]
    s = _run(losses)
    assert s["verdict"] == "too_high"
    assert s["sign_change_rate"] == 1.0
    assert s["rise_fraction"] == pytest.approx(0.5, abs=0.01)
    # Every step moves ~1.0 (the noise flips by 2 * 0.5) against a net smoothed decrease of
    # 4.5 - (1 - 0.5 * (1 - w) / (1 + w)) = 4.5 - 0.875 = 3.625: 999 / 3.625 = 275.6.
    assert s["tv_ratio"] == pytest.approx(275.6, rel=0.01)
    assert s["residual_std"] > 0.3
    assert "overshoots" in s["reason"] and "100%" in s["reason"] and "50%" in s["reason"]


def test_gaussian_batch_noise_on_a_good_curve_stays_ok() -> None:
    rng = random.Random(0)
    s = _run([v + 0.3 * rng.gauss(0, 1) for v in EXP_DECAY])
    # Turning-point rate of pure noise is 2/3, below the 0.75 oscillation threshold.
    assert s["sign_change_rate"] == pytest.approx(2 / 3, abs=0.05)
    assert s["tv_ratio"] > 10
    assert s["sign_change_threshold"] == 0.75
    assert s["verdict"] == "ok"


def test_oscillation_threshold_rises_for_short_runs() -> None:
    # 100 values without ties: 98 sign pairs; the turning-point count of noise has standard error
    # sqrt((16 * 100 - 29) / 90) / 98 = 4.1780 / 98 = 0.04263, so 2/3 + 3 * 0.04263 = 0.7946.
    rng = random.Random(5)
    s = _run([2.0 + rng.random() for _ in range(100)])
    assert s["sign_change_threshold"] == pytest.approx(0.7946, abs=1e-4)


def test_slow_linear_decay_with_tiny_update_ratio_is_too_low() -> None:
    s = _run([4 - 0.001 * t for t in STEPS], update_ratio=1e-5)
    assert s["verdict"] == "too_low"
    assert s["sign_change_rate"] == 0.0
    assert s["tv_ratio"] == pytest.approx(1.0, abs=0.01)
    # The EMA lags a line by w / (1 - w) = 1.5 steps: smoothed 4 - 0.001 (t - 1.5), final 3.0025.
    # 90% of the 0.9975 drop: 0.001 (t - 1.5) >= 0.89775 -> t >= 899.25.
    assert s["t90"] == 900
    assert s["auc_norm"] == pytest.approx(0.5, abs=0.005)
    # Chunk means centred on 2.5%, 72.5% and 97.5% of the run: (97.5 - 72.5) / (97.5 - 2.5) = 25/95.
    assert s["last_quarter_drop_frac"] == pytest.approx(25 / 95)
    assert "26%" in s["reason"] and "1.0e-05" in s["reason"]


def test_slow_decay_with_a_healthy_update_ratio_is_ok_but_says_more_steps_help() -> None:
    s = _run([4 - 0.001 * t for t in STEPS], update_ratio=1e-3)
    assert s["verdict"] == "ok"
    assert "more steps may help" in s["reason"]


def test_flat_loss_with_tiny_updates_is_too_low_and_rising_loss_is_too_high() -> None:
    rng = random.Random(1)
    flat = [2.0 + 0.01 * rng.gauss(0, 1) for _ in STEPS]
    flat[-50:] = [v + 0.02 for v in flat[-50:]]  # ends a touch above its start
    assert _run(flat, update_ratio=1e-6)["verdict"] == "too_low"
    rising = [2.0 + 0.0005 * t + 0.01 * rng.gauss(0, 1) for t in STEPS]
    s = _run(rising, update_ratio=1e-3)
    assert s["verdict"] == "too_high"
    assert "above where it started" in s["reason"]


def test_diverging_curve_with_nan_is_diverged() -> None:
    losses = EXP_DECAY[:600] + [1.0 * math.exp((t - 600) / 20) for t in range(600, 700)] + [math.inf, math.nan]
    s = _run(losses)
    assert s["verdict"] == "diverged"
    assert s["nonfinite_loss_step"] == 700
    assert s["n_losses"] == 700
    assert "step 700" in s["reason"]


def test_loss_that_explodes_without_nan_is_diverged() -> None:
    losses = EXP_DECAY[:500] + [1.0 + 0.05 * t for t in range(200)]  # ends near 11, > 4x the best of ~1.02
    s = _run(losses)
    assert s["final_loss"] > DIVERGED_LOSS_FACTOR * s["best_loss"]
    assert s["verdict"] == "diverged"


def test_status_diverged_forces_the_verdict() -> None:
    assert _run(EXP_DECAY)["verdict"] == "ok"
    s = _run(EXP_DECAY, status="diverged")
    assert s["verdict"] == "diverged"
    assert "stopped the run as diverged" in s["reason"]


def test_none_losses_are_missing_values_not_divergence() -> None:
    losses: list[float | None] = list(EXP_DECAY)
    losses[10] = None
    s = summarize_run(STEPS, {"loss": losses})
    assert s["verdict"] == "ok"
    assert s["n_losses"] == N - 1
    assert s["median_update_ratio"] is None and s["median_step_scale"] is None


def test_too_few_losses_or_none_at_all_gives_no_verdict() -> None:
    short = _run(EXP_DECAY[:10])
    assert short["verdict"] is None and "10 finite losses" in short["reason"]
    empty = summarize_run([], {})
    assert empty["verdict"] is None and empty["final_loss"] is None and empty["t90"] is None
    json.dumps(empty, allow_nan=False)


def test_misaligned_series_are_refused() -> None:
    with pytest.raises(ValueError, match="'lr'"):
        summarize_run([0, 1, 2], {"loss": [1.0, 0.9, 0.8], "lr": [1e-3]})


def test_median_step_scale_and_update_ratio() -> None:
    s = summarize_run(STEPS[:4], {"update_ratio": [1e-3, None, 3e-3, 2e-3], "step_scale": [1.0, 4.0, 2.0, math.nan]})
    assert s["median_update_ratio"] == 2e-3
    assert s["median_step_scale"] == 2.0


# --- spikes ----------------------------------------------------------------------------------------


def test_spike_detection_finds_one_planted_spike_at_its_step() -> None:
    rng = random.Random(2)
    steps = [t + 10 for t in STEPS]  # steps are not indexes
    loss = [2.0 + 0.1 * rng.gauss(0, 1) for _ in STEPS]
    grad = [1.0 + 0.05 * rng.gauss(0, 1) for _ in STEPS]
    loss[700] += 2.0  # 20 std above its neighbours
    grad[300] = 5.0
    s = summarize_run(steps, {"loss": loss, "grad_norm": grad})
    assert s["spike_steps"] == [710] and s["spike_count"] == 1
    assert s["grad_spike_steps"] == [310] and s["grad_spike_count"] == 1


def test_spike_needs_history_and_ignores_non_finite_values() -> None:
    values = [1.0 + 0.01 * (i % 3) for i in range(200)]
    values[SPIKE_MIN_HISTORY - 1] = 50.0  # too early to judge
    values[100] = math.inf  # not a spike: divergence is the verdict's business
    values[150] = 50.0
    assert spike_steps(list(range(200)), values) == [150]


def test_spike_window_forgets_old_values() -> None:
    # A noisy stretch, then 128+ quiet steps: a modest bump after that is a spike only because the
    # window no longer holds the noisy stretch.
    values = [1.0 + (0.5 if i % 2 else -0.5) for i in range(100)] + [1.0 + 0.001 * (i % 2) for i in range(200)]
    values.append(1.1)
    assert spike_steps(list(range(len(values))), values) == [300]
    assert spike_steps(list(range(len(values))), values, window=1000) == []


def test_spikes_and_a_stalled_loss_are_too_high() -> None:
    rng = random.Random(3)
    losses = [1 + 3 * math.exp(-t / 100) + 0.02 * rng.gauss(0, 1) for t in range(500)]
    losses += [1.0 + 0.002 * t + 0.02 * rng.gauss(0, 1) for t in range(500)]  # drifts back up to ~2
    losses[800] += 3.0
    s = _run(losses)
    assert s["spike_steps"] == [800]
    assert s["end_above_best_frac"] > 0.2
    assert s["verdict"] == "too_high"
    assert "step 800" in s["reason"]


def test_a_long_noisy_healthy_run_is_ok() -> None:
    rng = random.Random(4)
    n = 20_000
    loss = [1 + 3 * math.exp(-t / 3000) + 0.1 * rng.gauss(0, 1) for t in range(n)]
    series = {"loss": loss, "grad_norm": loss, "update_ratio": [1e-3] * n, "step_scale": [1.0] * n}
    s = summarize_run(list(range(n)), series)
    assert s["verdict"] == "ok"


# --- sweeps ----------------------------------------------------------------------------------------


def _sweep_run(
    run_id: int, lr: float, final: float | None, verdict: str | None, status: str = "completed", **more: float
) -> dict:
    summary = None if final is None and verdict is None else {"final_loss": final, "verdict": verdict, **more}
    return {"id": run_id, "learning_rate": lr, "status": status, "summary": summary}


def test_sweep_judges_each_rate_against_the_best_one() -> None:
    # The rates' own verdicts (solo) are overruled by the comparison: 1e-3 has the lowest loss, so it is ok
    # and recommended even though its own steps looked too large; the others lie on either side of it.
    runs = [
        _sweep_run(1, 1e-5, 2.0, "too_low"),
        _sweep_run(2, 1e-4, 1.3, "ok"),
        _sweep_run(3, 3e-4, 1.1, "ok"),
        _sweep_run(4, 1e-3, 1.0, "too_high"),
        _sweep_run(5, 3e-3, 1.02, "too_high"),  # within 5% of the best: as good
        _sweep_run(6, 1e-2, 1.6, "ok"),
        _sweep_run(7, 1e-1, None, "diverged", status="diverged"),
    ]
    result = summarize_sweep(runs)
    assert [r["id"] for r in result["ranking"]] == [4, 5, 3, 2, 6, 1, 7]
    assert [r["rank"] for r in result["ranking"]] == [1, 2, 3, 4, 5, 6, 7]
    verdicts = {r["learning_rate"]: r["verdict"] for r in result["ranking"]}
    assert verdicts == {1e-5: "too_low", 1e-4: "too_low", 3e-4: "too_low", 1e-3: "ok", 3e-3: "ok",
                        1e-2: "too_high", 1e-1: "diverged"}  # fmt: skip
    best = result["ranking"][0]
    assert best["solo_verdict"] == "too_high" and best["rank_loss"] == 1.0 and best["next_lrs"] == [1e-3]
    low = next(r for r in result["ranking"] if r["id"] == 1)
    assert low["reason"] == "Smoothed loss 2 against 1 at lr 0.001, the best here: the step size is too small."
    assert low["next_lrs"][0] == 1e-3
    assert result["recommended_lr"] == 1e-3 and result["recommended_run_id"] == 4
    assert result["ok_range"] == [1e-3, 3e-3] and result["rank_metric"] == "loss"
    assert result["edge"] is None and result["next_lrs"] == []
    assert "0.001 (run 4)" in result["sentence"] and "0.001 to 0.003" in result["sentence"]


def test_the_noise_band_comes_from_the_runs_own_spread() -> None:
    # Standard errors of 10% of each final loss: 1.3 against 1.0 is within 2 * hypot(0.13, 0.1) = 0.33.
    noisy = [_sweep_run(1, 1e-4, 1.3, "ok", final_loss_se=0.13), _sweep_run(2, 1e-3, 1.0, "ok", final_loss_se=0.1)]
    assert [r["verdict"] for r in summarize_sweep(noisy)["ranking"]] == ["ok", "ok"]
    quiet = [_sweep_run(1, 1e-4, 1.3, "ok", final_loss_se=0.01), _sweep_run(2, 1e-3, 1.0, "ok", final_loss_se=0.01)]
    assert [r["verdict"] for r in summarize_sweep(quiet)["ranking"]] == ["ok", "too_low"]


def test_sweep_ranks_by_eval_loss_when_every_run_has_one() -> None:
    runs = [
        _sweep_run(1, 1e-4, 1.0, "ok", final_eval_loss=1.5),
        _sweep_run(2, 1e-3, 1.2, "ok", final_eval_loss=1.1),
    ]
    result = summarize_sweep(runs)
    assert result["rank_metric"] == "eval_loss" and result["recommended_lr"] == 1e-3
    assert result["ranking"][1]["reason"].startswith("Eval loss 1.5 against 1.1 at lr 0.001")
    runs[0]["summary"]["final_eval_loss"] = None  # one without: all by the training loss
    assert summarize_sweep(runs)["recommended_lr"] == 1e-4


def test_sweep_flags_a_recommendation_at_the_edge_and_skips_unfinished_runs() -> None:
    runs = [
        _sweep_run(1, 1e-5, 2.0, "too_low"),
        _sweep_run(2, 1e-4, 1.5, "ok"),
        _sweep_run(3, 1e-3, 1.2, "ok", status="cancelled"),  # shorter run: not comparable
        _sweep_run(4, 1e-2, None, None, status="running"),
    ]
    result = summarize_sweep(runs)
    assert result["recommended_run_id"] == 2
    assert result["ok_range"] == [1e-4, 1e-4]
    assert [r["id"] for r in result["ranking"]] == [2, 1, 3, 4]
    assert next(r for r in result["ranking"] if r["id"] == 3)["verdict"] == "ok"  # its own verdict, not compared
    inside = summarize_sweep(runs[:2] + [_sweep_run(5, 1e-3, 1.9, "too_high")])
    assert inside["recommended_run_id"] == 2 and inside["edge"] is None
    high_edge = summarize_sweep(runs[:2])
    assert high_edge["edge"] == "high" and "a higher one may do better" in high_edge["sentence"]
    assert high_edge["next_lrs"] == [3.16e-4, 1e-3] and "try 0.000316 and 0.001" in high_edge["sentence"]
    low_edge = summarize_sweep([_sweep_run(1, 1e-5, 1.0, "ok"), _sweep_run(2, 1e-4, 1.2, "too_high")])
    assert low_edge["recommended_run_id"] == 1 and low_edge["next_lrs"] == [3.16e-6, 1e-6]
    assert low_edge["edge"] == "low" and "a lower one may do better" in low_edge["sentence"]
    above_diverged = summarize_sweep(runs[:2] + [_sweep_run(6, 1e-3, None, "diverged", status="diverged")])
    assert above_diverged["edge"] is None  # the rate above the best was tried: it diverged


def test_sweep_where_everything_diverges_suggests_going_lower() -> None:
    runs = [
        _sweep_run(1, 1e-3, None, "diverged", status="diverged"),
        _sweep_run(2, 1e-2, None, "diverged", status="diverged"),
    ]
    result = summarize_sweep(runs)
    assert result["recommended_lr"] is None and result["ok_range"] is None
    assert "below 0.001" in result["sentence"]
    assert summarize_sweep([])["recommended_lr"] is None


# --- LR range test ------------------------------------------------------------------------------------

# A small fixed curve: lr = 10^(-6 + i/2), i = 0..10.
RANGE_LRS = [10 ** (-6 + i / 2) for i in range(11)]
RANGE_LOSSES = [2.0, 2.2, 2.1, 1.9, 1.5, 1.2, 1.25, 1.0, 0.9, 1.4, 4.0]


def test_lr_range_suggestions_match_hand_computation() -> None:
    # Unsmoothed (weight 0) and nothing skipped, so the smoothed curve is the curve itself.
    # Stop: the best so far is 0.9 at i = 8, and 4.0 > 4 * 0.9 = 3.6 at i = 10 -> stop_index 10,
    # suggestions use i = 0..9.
    # Minimum: 0.9 at i = 8 -> 10^-2.
    # Steepest: forward differences over d(log10 lr) = 0.5 for i = 0..7 (up to the minimum):
    #   +0.2, -0.1, -0.2, -0.4, -0.3, +0.05, -0.25, -0.1  ->  /0.5: +0.4, -0.2, -0.4, -0.8, -0.6, +0.1, -0.5, -0.2
    #   most negative at i = 3 -> 10^-4.5.
    # Valley: longest strictly decreasing subsequence ending at each i:
    #   2.0:1  2.2:1  2.1:2  1.9:3  1.5:4  1.2:5  1.25:5  1.0:6  0.9:7  1.4:5
    #   longest 7, first ending at i = 8 -> start = 8 - 7 = 1, sections = 7/3 = 2.33,
    #   index = 1 + int(2.33) + int(1.17) = 1 + 2 + 1 = 4 -> 10^-4.
    result = lr_range_suggestions(RANGE_LRS, RANGE_LOSSES, weight=0.0, skip_start=0)
    assert result["stop_index"] == 10
    assert result["min_loss_index"] == 8 and result["min_loss_lr"] == pytest.approx(1e-2)
    assert result["steepest_index"] == 3 and result["steepest_lr"] == pytest.approx(10**-4.5)
    assert result["valley_index"] == 4 and result["valley_lr"] == pytest.approx(1e-4)
    # Suggested: a tenth of the minimum's rate (fastai's minimum rule), the sweep up to the minimum's rate.
    assert result["suggested_lr"] == pytest.approx(1e-3)
    assert result["sweep_lrs"] == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]


def test_lr_range_default_skip_keeps_the_same_valley() -> None:
    # The default skips len // 10 = 1 point (here 10 usable points): the valley 2.2 .. 0.9 now starts
    # at local 0 with length 7 ending at local 7 -> 0 + 2 + 1 = local 3 = global 4.
    result = lr_range_suggestions(RANGE_LRS, RANGE_LOSSES, weight=0.0)
    assert result["skip_start"] == 1
    assert result["valley_index"] == 4 and result["steepest_index"] == 3


def test_lr_range_smoothing_and_non_finite_stop() -> None:
    losses = [2.0, 1.8, 1.5, 1.2, math.nan, 0.5]
    result = lr_range_suggestions(RANGE_LRS[:6], losses, weight=0.5, skip_start=0)
    assert result["stop_index"] == 4  # the NaN stops the test
    # Smoothed (w = 0.5): 2.0, 1.8667, 1.6571, 1.4133: every step is the same 0.5 decade, and the
    # biggest drop is 1.6571 - 1.4133 at i = 2; the minimum is the last point, i = 3.
    assert result["steepest_index"] == 2
    assert result["min_loss_index"] == 3
    # A strictly decreasing 4-point curve: fastai's start = 3 - 4 = -1, index = -1 + 1 + 0 = 0.
    assert result["valley_index"] == 0


def test_lr_range_without_a_descent_has_no_steepest_point() -> None:
    result = lr_range_suggestions([1e-4, 1e-3, 1e-2], [1.0, 1.1, 1.2], weight=0.0, skip_start=0)
    assert result["steepest_lr"] is None and result["min_loss_index"] == 0
    assert result["valley_index"] == 0 and result["suggested_lr"] is None  # it never fell: no suggestion
    with pytest.raises(ValueError):
        lr_range_suggestions([0.0, 1e-3], [1.0, 0.9])


def _fastai_valley(losses: list[float]) -> int:
    """fastai's `valley` loop, transcribed to check ours against it."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


@given(st.lists(st.integers(0, 20).map(float), min_size=1, max_size=40))
def test_valley_matches_fastai_on_any_curve(losses: list[float]) -> None:
    # Small integers make ties (not a valley step: the descent must be strict) common.
    assert _valley_index(losses) == max(_fastai_valley(losses), 0)  # ours clamps fastai's -1 to 0


def test_range_test_stop_rule() -> None:
    stop = RangeTestStop(weight=0.0)
    assert [stop.update(v) for v in [3.0, 1.0, 2.0, 3.9]] == [False, False, False, False]
    assert stop.update(4.1) is True
    assert RangeTestStop().update(None) is True


def test_sweep_lrs_are_log_spaced_around_the_center() -> None:
    assert sweep_lrs(1e-3) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    assert sweep_lrs(2e-4, n=3) == [2e-5, 2e-4, 2e-3]
    assert sweep_lrs(5e-4, n=1) == [5e-4]


def test_barely_falling_loss_is_too_low_even_with_lora_sized_update_ratio() -> None:
    # 6.0 -> 5.5 in a straight line: 8% net decrease, a quarter of it in the last quarter, ratio 5e-4.
    s = _run([6 - 0.0005 * t for t in STEPS], update_ratio=5e-4)
    assert s["verdict"] == "too_low"
    assert "fell only 8%" in s["reason"]


def test_loss_rising_again_at_the_end_with_large_updates_is_too_high() -> None:
    # Falls from 6 to 2 over the first half, then drifts back up to 2.4: gives back 10% of its decrease.
    losses = [6 - 4 * t / 500 if t < 500 else 2 + 0.4 * (t - 500) / 500 for t in STEPS]
    s = _run(losses, update_ratio=2e-2)
    assert s["last_quarter_drop_frac"] < 0
    assert s["verdict"] == "too_high"
    assert "rose over the last quarter" in s["reason"]
    assert _run(losses, update_ratio=1e-3)["verdict"] != "too_high"  # small steps: not the step size's fault
