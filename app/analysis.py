"""Learning-rate insight: per-run scores and a verdict, sweep ranking, and LR range-test suggestions.

Everything here is a pure function of plain lists (no numpy, database or web code), so the trainer,
the API and the tests share one implementation. The loops are O(n) (medians and the valley search
are O(n log n)), which keeps a 20,000-step run far below a second.

A value may be None: SQLite stores a NaN as NULL, so a None loss is treated as missing, and only a
loss that is still NaN or infinite (or the run's `diverged` status) proves divergence. Every result is
JSON-serialisable: scores that do not exist (or are not finite) are None.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

# --- Smoothing ----------------------------------------------------------------------------------
# Debiased-EMA weight. 0.6 is TensorBoard's default. Its window is 1/(1-w) = 2.5 steps and it lags a
# trend by w/(1-w) = 1.5 steps, so the final loss stays honest even on a 50-step run (0.9 or 0.99
# would lag 9 or 99 steps, more than a short run has to spare).
SMOOTHING_WEIGHT = 0.6

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

# --- LR range test ------------------------------------------------------------------------------
# fastai smooths with 0.98 over a 100-iteration test, a lag of ~49 iterations (4 decades of lr when
# 100 steps span 8); 0.9 lags ~9 iterations.
RANGE_TEST_SMOOTHING = 0.9
# fastai's LRFinder stops once the smoothed loss exceeds 4x its best (`stop_div`).
RANGE_TEST_STOP_FACTOR = 4.0
# fastai's lr_find drops the first num_it // 10 points before suggesting: the EMA has barely
# started averaging there.
RANGE_TEST_SKIP_START_FRACTION = 0.1

VERDICTS = ("ok", "too_low", "too_high", "diverged")


class DebiasedEma:
    """TensorBoard's debiased EMA, one value at a time (the trainer's range test uses it to stop)."""

    def __init__(self, weight: float = SMOOTHING_WEIGHT) -> None:
        if not 0 <= weight < 1:
            raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
        self.weight = weight
        self.last = 0.0
        self.count = 0

    def update(self, value: float | None) -> float:
        """Fold in one value and return the smoothed value; a non-finite one passes through unchanged."""
        v = math.nan if value is None else float(value)
        if not math.isfinite(v):
            return v
        self.last = self.last * self.weight + (1 - self.weight) * v
        self.count += 1
        return self.last / (1 - self.weight**self.count)


def ema_smooth(values: Sequence[float | None], weight: float = SMOOTHING_WEIGHT) -> list[float]:
    """Smooth a series exactly as TensorBoard does (its "classic" smoothing); None becomes NaN.

    The dashboard's JavaScript replicates this line for line:

        if (every value === values[0]) return values;       // constant: returned as is
        let last = 0, count = 0;
        for each v:
            if (!Number.isFinite(v)) { out = v; continue; } // NaN/inf/null pass through
            last = last * w + (1 - w) * v;                  // the state skips non-finite values
            count += 1;
            out = last / (1 - w ** count);                  // debias: starting at 0 is no bias

    The default weight, 0.6, is TensorBoard's and suits short runs (see `SMOOTHING_WEIGHT`).
    """
    vals = [math.nan if v is None else float(v) for v in values]
    ema = DebiasedEma(weight)
    if vals and all(v == vals[0] for v in vals):
        return vals
    return [ema.update(v) for v in vals]


def exponential_lr(step: int, num_steps: int, min_lr: float, max_lr: float) -> float:
    """The range test's schedule: min_lr at step 0, max_lr at step num_steps - 1, geometric between."""
    if not 0 < min_lr <= max_lr:
        raise ValueError(f"need 0 < min_lr <= max_lr, got {min_lr} and {max_lr}")
    if num_steps <= 1:
        return min_lr
    return min_lr * (max_lr / min_lr) ** (step / (num_steps - 1))


class RangeTestStop:
    """The range test's stop rule: smoothed loss above 4x its best so far, or a non-finite loss."""

    def __init__(self, weight: float = RANGE_TEST_SMOOTHING, factor: float = RANGE_TEST_STOP_FACTOR) -> None:
        self.ema = DebiasedEma(weight)
        self.factor = factor
        self.best = math.inf
        self.smoothed = math.nan

    def update(self, loss: float | None) -> bool:
        """Fold in one step's loss; True means stop here."""
        self.smoothed = self.ema.update(loss)
        if not math.isfinite(self.smoothed):
            return True
        self.best = min(self.best, self.smoothed)
        return self.smoothed > self.factor * self.best


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


# --- Sweeps ---------------------------------------------------------------------------------------------

# Only a run that finished normally has a final loss comparable with its siblings'.
RECOMMENDABLE_STATUSES = (None, "completed")


def summarize_sweep(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rank a sweep's runs by smoothed final loss and recommend a learning rate.

    Each run is a mapping with `id`, `learning_rate`, `status` and `summary` (`summarize_run`'s
    result, or None). Runs without a final loss, and diverged ones, rank last. The recommendation is
    the lowest final loss among completed runs whose verdict is `ok` or `too_low`; `ok_range` spans the
    rates of the completed `ok` runs.
    """
    entries = []
    for run in runs:
        summary = run.get("summary") or {}
        entries.append(
            {
                "id": run["id"],
                "learning_rate": run["learning_rate"],
                "status": run.get("status"),
                "final_loss": summary.get("final_loss"),
                "verdict": summary.get("verdict"),
            }
        )
    entries.sort(key=_rank_key)
    for rank, entry in enumerate(entries, 1):
        entry["rank"] = rank
    eligible = [e for e in entries if _recommendable(e)]
    ok_lrs = [e["learning_rate"] for e in eligible if e["verdict"] == "ok"]
    best = eligible[0] if eligible else None
    result: dict[str, Any] = {
        "ranking": entries,
        "recommended_lr": best["learning_rate"] if best else None,
        "recommended_run_id": best["id"] if best else None,
        "ok_range": [min(ok_lrs), max(ok_lrs)] if ok_lrs else None,
        "edge": _edge(best, entries),
    }
    result["sentence"] = _sweep_sentence(result, entries, len(eligible))
    return result


def _rank_key(entry: dict[str, Any]) -> tuple[int, float, float]:
    loss = entry["final_loss"]
    unranked = loss is None or entry["verdict"] == "diverged" or entry["status"] == "diverged"
    return (1 if unranked else 0, math.inf if loss is None else loss, entry["learning_rate"])


def _recommendable(entry: dict[str, Any]) -> bool:
    return (
        entry["final_loss"] is not None
        and entry["verdict"] in ("ok", "too_low")
        and entry["status"] in RECOMMENDABLE_STATUSES
    )


def _edge(best: dict[str, Any] | None, entries: list[dict[str, Any]]) -> str | None:
    """Return "high" or "low" when the recommended rate is the highest or lowest one the sweep tried."""
    lrs = {e["learning_rate"] for e in entries}
    if best is None or len(lrs) < 2:
        return None
    if best["learning_rate"] == max(lrs):
        return "high"
    return "low" if best["learning_rate"] == min(lrs) else None


def _sweep_sentence(result: dict[str, Any], entries: list[dict[str, Any]], n_eligible: int) -> str:
    if result["recommended_lr"] is None:
        judged = [e for e in entries if e["verdict"] is not None]
        if judged and all(e["verdict"] in ("too_high", "diverged") for e in judged):
            lowest = min(e["learning_rate"] for e in judged)
            return (
                f"No rate can be recommended: all {len(judged)} judged runs overshot or diverged, "
                f"so try rates below {lowest:.3g}."
            )
        return "No rate can be recommended yet: no completed run finished without overshooting or diverging."
    best = entries[[e["id"] for e in entries].index(result["recommended_run_id"])]
    text = (
        f"Recommended learning rate {best['learning_rate']:.3g} (run {best['id']}): the lowest smoothed final loss, "
        f"{best['final_loss']:.4g}, among {n_eligible} completed runs that neither overshot nor diverged"
    )
    if result["ok_range"]:
        low, high = result["ok_range"]
        text += f"; rates {low:.3g} to {high:.3g} were ok" if low != high else f"; only {low:.3g} was ok"
    if result["edge"] == "high":
        text += "; it is the highest rate tried, so a higher one may do better"
    elif result["edge"] == "low":
        text += "; it is the lowest rate tried, so a lower one may do better"
    return text + "."


# --- LR range test --------------------------------------------------------------------------------------


def lr_range_suggestions(
    lrs: Sequence[float],
    losses: Sequence[float | None],
    weight: float = RANGE_TEST_SMOOTHING,
    skip_start: int | None = None,
) -> dict[str, Any]:
    """Suggested learning rates from an LR range test (lrs growing, one loss per step).

    The losses are smoothed with the debiased EMA and cut at `stop_index`, the first step where the
    range test's stop rule fires (`RangeTestStop`: smoothed loss above 4x its best, or non-finite).
    Like fastai, the first `skip_start` points (default a tenth) are left out of the suggestions.
    On what remains:
    - `min_loss_lr`: the rate at the smoothed loss's minimum (fastai's "minimum" rule suggests a tenth
      of it);
    - `steepest_lr`: the most negative forward difference of the smoothed loss against log10(lr),
      (s[i+1] - s[i]) / (log10 lr[i+1] - log10 lr[i]) for i+1 up to the minimum, reported at lr[i]
      as fastai's "steep" rule does;
    - `valley_lr`: fastai's "valley" rule (see `_valley_index`), which `suggested_lr` follows
      (falling back on `steepest_lr`), with `sweep_lrs` five rates around it.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} learning rates for {len(losses)} losses")
    if any(not lr > 0 for lr in lrs):
        raise ValueError("learning rates must be positive")
    stopper = RangeTestStop(weight)
    smooth: list[float] = []
    stop_index = None
    for i, loss in enumerate(losses):
        if stopper.update(loss):
            stop_index = i
            break
        smooth.append(stopper.smoothed)
    start = len(smooth) // 10 if skip_start is None else skip_start
    result: dict[str, Any] = {"stop_index": stop_index, "smoothing_weight": weight, "skip_start": start}
    segment, segment_lrs = smooth[start:], list(lrs[start : len(smooth)])
    indices: dict[str, int | None] = {"min_loss": None, "steepest": None, "valley": None}
    if len(segment) >= 2:
        lowest = min(range(len(segment)), key=segment.__getitem__)
        indices = {
            "min_loss": lowest,
            "steepest": _steepest_index(segment_lrs, segment, lowest),
            "valley": _valley_index(segment),
        }
    for name, index in indices.items():
        result[f"{name}_index"] = None if index is None else start + index
        result[f"{name}_lr"] = None if index is None else segment_lrs[index]
    suggested = result["valley_lr"] if result["valley_lr"] is not None else result["steepest_lr"]
    result["suggested_lr"] = suggested
    result["sweep_lrs"] = sweep_lrs(suggested) if suggested is not None else []
    return result


def _steepest_index(lrs: list[float], smooth: list[float], lowest: int) -> int | None:
    best_i, best_slope = None, 0.0
    for i in range(lowest):
        run = math.log10(lrs[i + 1]) - math.log10(lrs[i])
        if run <= 0:
            continue
        slope = (smooth[i + 1] - smooth[i]) / run
        if slope < best_slope:
            best_i, best_slope = i, slope
    return best_i


def _valley_index(values: list[float]) -> int:
    """fastai's "valley" rule (ESRI's): a point inside the longest valley of the curve.

    The valley is the longest strictly decreasing subsequence (not necessarily contiguous); fastai
    finds it in O(n^2), we find the same one in O(n log n). With L its length and `end` the first
    index where one that long ends, fastai sets start = end - L and returns
    start + int(L / 3) + int(L / 3 / 2). Its docs call this "roughly 2/3 through"; the arithmetic
    lands near the middle, and we keep the arithmetic so that our suggestions match fastai's.
    One deviation: fastai can return index -1 (the last point) when a 2-long valley ends at index 1;
    we return 0.
    """
    # lengths[i]: longest strictly decreasing subsequence ending at i, by patience sorting on -v.
    tails: list[float] = []
    lengths: list[int] = []
    for v in values:
        pos = bisect.bisect_left(tails, -v)
        if pos == len(tails):
            tails.append(-v)
        else:
            tails[pos] = -v
        lengths.append(pos + 1)
    longest = max(lengths)
    if longest == 1:
        return 0
    end = lengths.index(longest)
    start = end - longest
    sections = (end - start) / 3
    return max(start + int(sections) + int(sections / 2), 0)


def sweep_lrs(center: float, n: int = 5, decades: float = 2.0) -> list[float]:
    """`n` log-spaced rates spanning `decades` around `center`, to 3 significant digits.

    With the defaults: center x 10^[-1, -0.5, 0, 0.5, 1].
    """
    if not center > 0:
        raise ValueError(f"center must be positive, got {center}")
    if n == 1:
        return [float(f"{center:.3g}")]
    exponents = [-decades / 2 + decades * i / (n - 1) for i in range(n)]
    return [float(f"{center * 10**e:.3g}") for e in exponents]
