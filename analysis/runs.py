"""Per-run scores and a verdict on the run's learning rate.

Everything here is a pure function of plain lists (no numpy, database or web code), so the trainer,
the API and the tests share one implementation. The loops are O(n) (medians are O(n log n)), which
keeps a 20,000-step run far below a second.

A value may be None: SQLite stores a NaN as NULL, so a None loss is treated as missing, and only a
loss that is still NaN or infinite (or the run's `diverged` status) proves divergence. Every result is
JSON-serialisable: scores that do not exist (or are not finite) are None.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from analysis.smoothing import SMOOTHING_WEIGHT, ema_smooth

# --- Spikes -------------------------------------------------------------------------------------
# A value above mean + 6 std of the previous 128 steps: the rule, a common stability monitor.
SPIKE_WINDOW = 128
SPIKE_SIGMAS = 6.0
# Ours: with fewer than 32 previous values the std is too rough (and the first steps of fine-tuning
# move fast), so no spike is called before then.
SPIKE_MIN_HISTORY = 32
# Only the first 100 spike steps are listed; the counts hold the totals.
MAX_LISTED_SPIKES = 100

# --- Step size ----------------------------------------------------------------------------------
# Update ratio ||dtheta||/||theta||: practitioners aim near 1e-3 (CS231n's "ratio of weight updates
# to weight magnitudes"); a decade below or above is what we call tiny or large.
UPDATE_RATIO_TARGET = 1e-3
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2

# --- Oscillation --------------------------------------------------------------------------------
# Among N independent noisy values, consecutive differences change sign with probability 2/3; the
# count of such turning points has variance (16N - 29)/90 (the turning point test of randomness).
# A step that overshoots a valley bounces across it, pushing the rate towards 1. The loss oscillates
# when the rate is above max(0.75, 2/3 + 3 standard errors), so that batch noise alone is not enough,
# and the loss travelled at least 3x its net decrease.
NOISE_SIGN_CHANGE_RATE = 2 / 3
OSCILLATION_MIN_SIGN_CHANGE = 0.75
OSCILLATION_Z = 3.0
OSCILLATION_MIN_TV_RATIO = 3.0

# --- Trend --------------------------------------------------------------------------------------
# The run is cut into 20 equal chunks whose mean losses are compared: averaging removes batch noise
# that would otherwise make any single point (the last, the best) a matter of luck. A verdict needs
# one loss per chunk at least.
TREND_CHUNKS = 20
MIN_POINTS_FOR_VERDICT = TREND_CHUNKS
# Stalled: the last chunk is at least 20% of the achieved decrease above the best chunk.
STALLED_END_ABOVE_BEST = 0.2
# Slow: at least 15% of the net decrease came in the last quarter (a linear descent gives 25%, an
# exponential one that has converged about 0%).
SLOW_LAST_QUARTER_DROP = 0.15
# ... and slow for any update ratio when, besides, the loss has fallen by less than 15% of where it
# started. LoRA's update ratios run high (B starts at zero, so its norm is small), which hides a too-small
# rate from the update-ratio test alone; on the tiny model an SGD rate 100x too small drops the loss ~6%.
SLOW_NET_DECREASE = 0.15
# Diverged: the smoothed loss ended above 4x its best, the factor at which fastai's LR finder stops.
DIVERGED_LOSS_FACTOR = 4.0

VERDICTS = ("ok", "too_low", "too_high", "diverged")


# --- Per-run scores ---------------------------------------------------------------------------------


def summarize_run(
    steps: Sequence[int], series: Mapping[str, Sequence[float | None]], status: str | None = None
) -> dict[str, Any]:
    """Scores of one run and a verdict on its learning rate.

    `series` holds the recorded columns by name, aligned with `steps`; `loss`, `grad_norm`,
    `update_ratio` and `step_scale` are read and any may be missing. A `status` of "diverged", a NaN
    or infinite loss, or a smoothed loss that ends above 4x its best forces the verdict `diverged`.
    The verdict is None (with a reason) when fewer than `MIN_POINTS_FOR_VERDICT` losses exist.
    """
    n = len(steps)
    for name, column in series.items():
        if len(column) != n:
            raise ValueError(f"series {name!r} has {len(column)} values for {n} steps")
    loss_steps, losses, nonfinite_step = _finite_losses(steps, series.get("loss", ()))
    summary: dict[str, Any] = {
        "n_steps": n,
        "n_losses": len(losses),
        "smoothing_weight": SMOOTHING_WEIGHT,
        "nonfinite_loss_step": nonfinite_step,
    }
    summary |= _loss_scores(loss_steps, losses, ema_smooth(losses))
    summary |= _sign_scores(losses)
    summary |= _trend_scores(losses)
    summary |= _spike_scores(steps, series)
    summary["median_update_ratio"] = _median(series.get("update_ratio", ()))
    summary["median_step_scale"] = _median(series.get("step_scale", ()))
    summary["verdict"], summary["reason"] = _verdict(summary, status)
    return {key: _json_value(value) for key, value in summary.items()}


def _finite_losses(steps: Sequence[int], column: Sequence[float | None]) -> tuple[list[int], list[float], int | None]:
    """The steps and values of the finite losses, and the first step whose loss was NaN or infinite."""
    kept_steps: list[int] = []
    kept: list[float] = []
    nonfinite_step = None
    for step, value in zip(steps, column, strict=False):
        if value is None:
            continue
        v = float(value)
        if math.isfinite(v):
            kept_steps.append(step)
            kept.append(v)
        elif nonfinite_step is None:
            nonfinite_step = step
    return kept_steps, kept, nonfinite_step


def _loss_scores(steps: list[int], raw: list[float], smooth: list[float]) -> dict[str, Any]:
    """Final, best and initial smoothed loss, t90, normalised area, total variation and residuals."""
    keys = ("initial_loss", "final_loss", "best_loss", "best_step", "raw_best_loss", "t90", "auc_norm")
    if not raw:
        return dict.fromkeys((*keys, "tv_ratio", "residual_std", "residual_rel"))
    best_i = min(range(len(smooth)), key=smooth.__getitem__)
    initial, final, best = smooth[0], smooth[-1], smooth[best_i]
    net = initial - final
    tv = math.fsum(abs(b - a) for a, b in zip(raw, raw[1:], strict=False))
    residuals = [r - s for r, s in zip(raw, smooth, strict=True)]
    residual_std = _pstdev(residuals)
    return {
        "initial_loss": initial,
        "final_loss": final,
        "best_loss": best,
        "best_step": steps[best_i],
        "raw_best_loss": min(raw),
        "t90": _t90(steps, smooth),
        "auc_norm": _auc_norm(steps, smooth, best),
        "tv_ratio": tv / net if net > 0 else None,
        "residual_std": residual_std,
        "residual_rel": residual_std / abs(final) if final else None,
    }


def _t90(steps: list[int], smooth: list[float]) -> int | None:
    """First step at which the smoothed loss has made 90% of its net decrease (start to end)."""
    drop = smooth[0] - smooth[-1]
    if drop <= 0:
        return None
    target = smooth[0] - 0.9 * drop
    return next(step for step, s in zip(steps, smooth, strict=True) if s <= target)


def _auc_norm(steps: list[int], smooth: list[float], best: float) -> float | None:
    """Area between the smoothed loss and its best, over the box (start - best) x (step span).

    0 means the loss dropped to its best at once, 1 that it stayed at its start; an exponential decay
    e^(-kt) over T steps gives about 1/(kT), a straight line 1/2. Trapezoids handle uneven steps.
    """
    height = smooth[0] - best
    width = steps[-1] - steps[0]
    if height <= 0 or width <= 0:
        return None
    area = math.fsum(
        (s1 + s2 - 2 * best) * (t2 - t1) / 2
        for t1, t2, s1, s2 in zip(steps, steps[1:], smooth, smooth[1:], strict=False)
    )
    return area / (height * width)


def _sign_scores(raw: list[float]) -> dict[str, Any]:
    """Fraction of rising steps, and of consecutive (non-zero) differences that change sign."""
    rises = pairs = changes = 0
    previous: bool | None = None
    for a, b in zip(raw, raw[1:], strict=False):
        if b == a:
            continue
        rising = b > a
        rises += rising
        if previous is not None:
            pairs += 1
            changes += rising != previous
        previous = rising
    threshold = None
    if pairs:
        n = pairs + 2  # points behind `pairs` interior turning-point candidates
        stderr = math.sqrt((16 * n - 29) / 90) / pairs
        threshold = max(OSCILLATION_MIN_SIGN_CHANGE, NOISE_SIGN_CHANGE_RATE + OSCILLATION_Z * stderr)
    return {
        "rise_fraction": rises / (len(raw) - 1) if len(raw) > 1 else None,
        "sign_change_rate": changes / pairs if pairs else None,
        "sign_change_threshold": threshold,
    }


def _trend_scores(raw: list[float]) -> dict[str, Any]:
    """Chunk means: the share of the net decrease made in the last quarter, and the end's give-back."""
    n = len(raw)
    if n < TREND_CHUNKS:
        return dict.fromkeys(
            ("trend_first_loss", "trend_last_loss", "trend_best_loss", "last_quarter_drop_frac", "end_above_best_frac")
        )
    means = []
    for i in range(TREND_CHUNKS):
        chunk = raw[i * n // TREND_CHUNKS : (i + 1) * n // TREND_CHUNKS]
        means.append(math.fsum(chunk) / len(chunk))
    first, last, best = means[0], means[-1], min(means)
    three_quarters = means[TREND_CHUNKS * 3 // 4 - 1]  # the chunk that ends at 75% of the run
    return {
        "trend_first_loss": first,
        "trend_last_loss": last,
        "trend_best_loss": best,
        "last_quarter_drop_frac": (three_quarters - last) / (first - last) if first > last else None,
        "end_above_best_frac": (last - best) / (first - best) if first > best else None,
    }


def spike_steps(
    steps: Sequence[int],
    values: Sequence[float | None],
    window: int = SPIKE_WINDOW,
    sigmas: float = SPIKE_SIGMAS,
    min_history: int = SPIKE_MIN_HISTORY,
) -> list[int]:
    """Steps whose value exceeds mean + `sigmas` * std (population) of the previous `window` values.

    Missing and non-finite values are skipped, neither tested nor remembered. Sums run over values
    shifted by the first one, which keeps the variance exact enough for large, steady values.
    """
    found: list[int] = []
    history: deque[float] = deque()
    shift = total = total_sq = 0.0
    for step, value in zip(steps, values, strict=False):
        if value is None or not math.isfinite(value):
            continue
        if not history:  # the first value: the window never empties again
            shift = float(value)
        v = value - shift
        k = len(history)
        if k >= min_history:
            mean = total / k
            std = math.sqrt(max(total_sq / k - mean * mean, 0.0))
            if v > mean + sigmas * std:
                found.append(step)
        history.append(v)
        total += v
        total_sq += v * v
        if len(history) > window:
            old = history.popleft()
            total -= old
            total_sq -= old * old
    return found


def _spike_scores(steps: Sequence[int], series: Mapping[str, Sequence[float | None]]) -> dict[str, Any]:
    loss = spike_steps(steps, series.get("loss", ()))
    grad = spike_steps(steps, series.get("grad_norm", ()))
    return {
        "spike_count": len(loss),
        "spike_steps": loss[:MAX_LISTED_SPIKES],
        "grad_spike_count": len(grad),
        "grad_spike_steps": grad[:MAX_LISTED_SPIKES],
    }


def _median(values: Sequence[float | None]) -> float | None:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def _pstdev(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- Verdict --------------------------------------------------------------------------------------


def _verdict(s: dict[str, Any], status: str | None) -> tuple[str | None, str]:
    """The verdict and one plain sentence that gives its reasons with the numbers."""
    reason = _diverged_reason(s, status)
    if reason:
        return "diverged", reason
    if s["n_losses"] < MIN_POINTS_FOR_VERDICT:
        return None, (
            f"Only {s['n_losses']} finite losses were recorded; "
            f"at least {MIN_POINTS_FOR_VERDICT} are needed to judge the step size."
        )
    reason = _too_high_reason(s)
    if reason:
        return "too_high", reason
    reason = _too_low_reason(s)
    if reason:
        return "too_low", reason
    return "ok", _ok_reason(s)


def _diverged_reason(s: dict[str, Any], status: str | None) -> str | None:
    final, best = s["final_loss"], s["best_loss"]
    if s["nonfinite_loss_step"] is not None:
        after = f" after a best smoothed loss of {best:.4g}" if best is not None else ""
        return f"The loss became non-finite at step {s['nonfinite_loss_step']}{after}: the run diverged."
    if final is not None and best is not None and best > 0 and final > DIVERGED_LOSS_FACTOR * best:
        return f"The smoothed loss ended at {final:.4g}, {final / best:.1f}x its best of {best:.4g}: the run diverged."
    if status == "diverged":
        at = f" with its smoothed loss at {final:.4g} against a best of {best:.4g}" if final is not None else ""
        return f"The trainer stopped the run as diverged{at}."
    return None


def _too_high_reason(s: dict[str, Any]) -> str | None:
    rate, threshold, tv = s["sign_change_rate"], s["sign_change_threshold"], s["tv_ratio"]
    if rate is not None and rate >= threshold and (tv is None or tv >= OSCILLATION_MIN_TV_RATIO):
        travel = f"travelling {tv:.0f}x its net decrease" if tv is not None else "with no net decrease"
        return (
            f"Loss rose on {s['rise_fraction']:.0%} of steps and changed direction at {rate:.0%} of them "
            f"(noise alone gives about 67%), {travel}: the step size overshoots."
        )
    ratio = s["median_update_ratio"]
    tiny = ratio is not None and ratio < UPDATE_RATIO_LOW
    first, last = s["trend_first_loss"], s["trend_last_loss"]
    if last > first and not tiny:
        return (
            f"The loss ended above where it started (mean {last:.4g} over the last 5% of steps against "
            f"{first:.4g} over the first): the steps are too large to make progress."
        )
    give_back = s["end_above_best_frac"]
    late = s["last_quarter_drop_frac"]
    if ratio is not None and ratio > UPDATE_RATIO_HIGH and late is not None and late < 0:
        return (
            f"The loss rose over the last quarter of the run ({-late:.0%} of its decrease given back) with a "
            f"median update ratio of {ratio:.1e}, {ratio / UPDATE_RATIO_TARGET:.0f}x the usual 1e-3: "
            "the step size is too large to settle."
        )
    if give_back is None or give_back < STALLED_END_ABOVE_BEST:
        return None
    n_spikes = s["spike_count"] + s["grad_spike_count"]
    if n_spikes:
        first_spike = min(s["spike_steps"][:1] + s["grad_spike_steps"][:1])
        return (
            f"The loss or grad norm spiked {n_spikes} times (first at step {first_spike}) and the loss ended "
            f"{give_back:.0%} of its decrease above its best: the step size is too large."
        )
    if ratio is not None and ratio > UPDATE_RATIO_HIGH:
        return (
            f"The median update ratio {ratio:.1e} is {ratio / UPDATE_RATIO_TARGET:.0f}x the usual 1e-3 and the "
            f"loss ended {give_back:.0%} of its decrease above its best: the step size is too large."
        )
    return None


def _too_low_reason(s: dict[str, Any]) -> str | None:
    ratio = s["median_update_ratio"]
    first, last, late = s["trend_first_loss"], s["trend_last_loss"], s["last_quarter_drop_frac"]
    if ratio is not None and ratio < UPDATE_RATIO_LOW and last >= first:
        return (
            f"The loss barely moved ({first:.4g} to {last:.4g}) with a median update ratio of {ratio:.1e}, "
            "far below the usual 1e-3: the step size is too small."
        )
    if late is None or late < SLOW_LAST_QUARTER_DROP:
        return None
    net = (first - last) / abs(first) if first else None
    if ratio is not None and ratio >= UPDATE_RATIO_LOW and (net is None or net >= SLOW_NET_DECREASE):
        return None
    if ratio is not None and ratio >= UPDATE_RATIO_LOW:
        return (
            f"The loss fell only {net:.0%} ({first:.4g} to {last:.4g}) and was still falling steadily "
            f"({late:.0%} of its decrease came in the last quarter): the step size is too small."
        )
    step_size = (
        f"a median update ratio of {ratio:.1e}, far below the usual 1e-3" if ratio is not None else "no update ratio"
    )
    return (
        f"The loss was still falling steadily ({late:.0%} of its decrease came in the last quarter) "
        f"with {step_size}: the step size is too small."
    )


def _ok_reason(s: dict[str, Any]) -> str:
    parts = [f"The smoothed loss went from {s['initial_loss']:.4g} to {s['final_loss']:.4g}"]
    if s["t90"] is not None:
        parts.append(f", 90% of the way by step {s['t90']}")
    if s["median_update_ratio"] is not None:
        parts.append(f", with a median update ratio of {s['median_update_ratio']:.1e}")
    n_spikes = s["spike_count"] + s["grad_spike_count"]
    parts.append(" and no spikes" if not n_spikes else f" and {n_spikes} spikes")
    parts.append(": the step size looks right")
    late = s["last_quarter_drop_frac"]
    if late is not None and late >= SLOW_LAST_QUARTER_DROP:
        parts.append(f", though {late:.0%} of the decrease came in the last quarter, so more steps may help")
    return "".join(parts) + "."
