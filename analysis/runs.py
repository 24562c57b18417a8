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
# Rising again: the last chunk's mean above the one at three quarters by 3 standard errors of a chunk mean.
LATE_RISE_Z = 3.0
# Slow: at least 15% of the net decrease came in the last quarter (a linear descent gives 25%, an
# exponential one that has converged about 0%).
SLOW_LAST_QUARTER_DROP = 0.15
# ... and slow for any update ratio when, besides, the loss has fallen by less than 15% of where it
# started. LoRA's update ratios run high (B starts at zero, so its norm is small), which hides a too-small
# rate from the update-ratio test alone; on the tiny model an SGD rate 100x too small drops the loss ~6%.
SLOW_NET_DECREASE = 0.15
# Diverged: the smoothed loss rose above 4x where the run started (the factor at which fastai's LR finder
# stops, measured from the start rather than the best, so that a run near zero loss that meets one noisy
# batch is not called diverged) and by more than 1 nat (e^1 = 2.7x the perplexity), so that a run that
# starts near zero is not either. The trainer's guard stops a run by the same rule.
DIVERGED_LOSS_FACTOR = 4.0
DIVERGED_MIN_RISE = 1.0
# A run that ended with its smoothed loss above twice where it started (and 1 nat above) diverged too: it
# got much worse and did not recover. (While it runs the guard waits for 4x: a run can still come back
# from 2x, as SmolLM2 at AdamW 1e-2 did, from 1.9x to 0.4x its start.)
DIVERGED_FINAL_FACTOR = 2.0

# --- Evidence about the step size (calibrated on real sweeps: bench/results/verdicts.md) ---------------
# Where a run started: the median of its first 3 losses, so that one easy or hard first batch does not
# move it (the tiny model's first arithmetic batch is 10% below the next ones).
START_STEPS = 3
# The gradient alignment cos(g_t, θ_{t−1} − θ_t) and the update cosine are read over the later part of a
# run (its last two thirds), once the first fast steps are over.
LATE_FRACTION = 2 / 3
# Their standard error comes from the means of 5 blocks of steps: neighbouring steps are correlated.
ALIGNMENT_BLOCKS = 5
# Too small: a mean alignment of +0.05 or more, 3 standard errors above zero, while the loss still falls.
# Measured: too-small rates give +0.11 to +0.67 (SmolLM2 AdamW 1e-4 and 1e-5, tiny SGD 1e-3 and 1e-2, tiny
# AdamW 1e-5 to 1e-3), the best ones -0.30 to +0.13; the loss still falling is what tells the too-small
# ones apart (a best AdamW run that has converged, or a too-large one on a noisy plateau, can lean positive).
ALIGNMENT_TOO_LOW = 0.05
ALIGNMENT_Z = 3.0
# From +0.2 on, consecutive gradients stay alike: the run crawls, and the next rate to try is 10x, not 3x.
ALIGNMENT_CRAWL = 0.2
# Too large, from a plateau: the loss stopped falling above 10% of where it started while the mean
# alignment was -0.1 or lower (the steps bounce across the valley). Plain SGD at its best rate bounces too
# (-0.3 on the tiny model, the edge of stability) but keeps falling; a converged run sits below 10%.
ALIGNMENT_BOUNCE = 0.1
PLATEAU_MIN = 0.1
# Too large, from the start: the smoothed loss climbed 25% above where the run started (SmolLM2 AdamW 1e-2
# climbed to 1.9x and 2.5x, 1e-1 to 7x-13x; no good or small rate went above 1.04x).
PEAK_RISE = 0.25
# Too large, from the eval set: the eval loss rose at least 0.1 nats (10% in perplexity) and 5% above the
# eval before it, twice or more, or once by 0.5 nats and 20%. The eval set is the same each time, so a rise
# is the weights getting worse, not batch noise. One rise of 0.13 to 0.23 nats happened at a best rate
# (the tiny model on arithmetic, AdamW 1e-2); too-large rates rose again and again, or jumped by 0.6 to 4.
EVAL_RISE_MIN = 0.1
EVAL_RISE_REL = 0.05
EVAL_RISES = 2
EVAL_JUMP_MIN = 0.5
EVAL_JUMP_REL = 0.2
# Evals hold no batch noise, so they are smoothed lightly: a 1.4-eval window that lags a trend 0.4 evals.
EVAL_SMOOTHING_WEIGHT = 0.3
# Still falling: each of the last half's evals (or 4 chunk means of the training loss) below the one before,
# by 0.5% of the starting loss in all.
FALLING_MIN = 0.005
FALLING_CHUNKS = 4
# An `ok` needs the loss to have fallen by 5% of where it started; less, with no other evidence, is inconclusive.
FELL_MIN = 0.05

VERDICTS = ("ok", "too_low", "too_high", "diverged", "inconclusive")


# --- Per-run scores ---------------------------------------------------------------------------------


def summarize_run(
    steps: Sequence[int],
    series: Mapping[str, Sequence[float | None]],
    status: str | None = None,
    evals: tuple[Sequence[int], Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """Scores of one run and a verdict on its learning rate, with the rates to try next.

    `series` holds the recorded columns by name, aligned with `steps`; `loss`, `lr`, `grad_norm`,
    `update_ratio`, `step_scale`, `grad_alignment` and `update_cos` are read and any may be missing.
    `evals` is (steps, eval losses). A `status` of "diverged", a NaN or infinite loss, or a smoothed loss
    that ends far above where it started forces the verdict `diverged`. The verdict is None (with a
    reason) when fewer than `MIN_POINTS_FOR_VERDICT` losses exist.
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
    summary["start_loss"] = _median(losses[:START_STEPS]) if losses else None
    summary |= _sign_scores(losses)
    summary |= _trend_scores(losses)
    summary |= _spike_scores(steps, series)
    summary["median_update_ratio"] = _median(series.get("update_ratio", ()))
    summary["median_step_scale"] = _median(series.get("step_scale", ()))
    summary |= _cosine_scores(series)
    summary |= _eval_scores(evals)
    eval_values = [float(v) for v in (evals or ((), ()))[1] if v is not None and math.isfinite(v)]
    summary["verdict"], summary["reason"] = _verdict(summary, status, losses, eval_values)
    rates = [v for v in series.get("lr", ()) if v is not None and math.isfinite(v) and v > 0]
    summary["learning_rate"] = max(rates) if rates else None
    summary["next_lrs"] = next_rates(summary["verdict"], summary["learning_rate"], summary["grad_alignment_mean"])
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
        return dict.fromkeys(
            (*keys, "tv_ratio", "residual_std", "residual_rel", "peak_loss", "peak_step", "final_loss_se")
        )
    best_i = min(range(len(smooth)), key=smooth.__getitem__)
    # The highest point after the steps that set where the run started (a climb, not the start itself).
    peak_i = max(range(min(START_STEPS, len(smooth) - 1), len(smooth)), key=smooth.__getitem__)
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
        "peak_loss": smooth[peak_i],
        "peak_step": steps[peak_i],
        "final_loss_se": _final_se(residuals),
    }


def _final_se(residuals: list[float]) -> float:
    """Standard error of the smoothed final loss: the residuals' spread over the run's later part times the
    EMA's noise gain, sqrt((1 - w) / (1 + w)) for white noise (0.5 at w = 0.6)."""
    late = residuals[len(residuals) - int(len(residuals) * LATE_FRACTION) :] or residuals
    return _pstdev(late) * math.sqrt((1 - SMOOTHING_WEIGHT) / (1 + SMOOTHING_WEIGHT))


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


# --- Evidence about the step size ----------------------------------------------------------------------


def _late(values: Sequence[float | None]) -> list[float]:
    """The finite values of the later part of a run (the last LATE_FRACTION of its steps)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return finite[len(finite) - int(len(finite) * LATE_FRACTION) :]


def _mean_and_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error from ALIGNMENT_BLOCKS block means (neighbouring steps are correlated, so
    the spread of block means says more than the spread of steps)."""
    if len(values) < 2 * ALIGNMENT_BLOCKS:
        return None, None
    n = len(values)
    means = [
        math.fsum(values[i * n // ALIGNMENT_BLOCKS : (i + 1) * n // ALIGNMENT_BLOCKS]) for i in range(ALIGNMENT_BLOCKS)
    ]
    means = [m / len(values[i * n // ALIGNMENT_BLOCKS : (i + 1) * n // ALIGNMENT_BLOCKS]) for i, m in enumerate(means)]
    mean = math.fsum(means) / ALIGNMENT_BLOCKS
    var = math.fsum((m - mean) ** 2 for m in means) / (ALIGNMENT_BLOCKS - 1)
    return mean, math.sqrt(var / ALIGNMENT_BLOCKS)


def _chunk_means(values: list[float], chunks: int) -> list[float]:
    """The means of `chunks` consecutive, near-equal parts of `values` (at least one value each)."""
    n = len(values)
    parts = [values[i * n // chunks : (i + 1) * n // chunks] for i in range(chunks)]
    return [math.fsum(p) / len(p) for p in parts]


def _cosine_scores(series: Mapping[str, Sequence[float | None]]) -> dict[str, Any]:
    """The gradient alignment and update cosine over the later part of the run: mean, standard error, t."""
    out: dict[str, Any] = {}
    for name in ("grad_alignment", "update_cos"):
        mean, se = _mean_and_se(_late(series.get(name, ())))
        out[f"{name}_mean"], out[f"{name}_se"] = mean, se
        out[f"{name}_t"] = mean / se if mean is not None and se else None
    return out


def _eval_scores(evals: tuple[Sequence[int], Sequence[float | None]] | None) -> dict[str, Any]:
    """The eval series' smoothed final value and its biggest rise between two evals."""
    steps, losses = evals or ((), ())
    points = [(s, float(v)) for s, v in zip(steps, losses, strict=True) if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"n_evals": len(points), "final_eval_loss": None, "max_eval_loss": None, "eval_rises": 0,
                           "eval_rise": None, "eval_rise_step": None, "eval_jump": False}  # fmt: skip
    if not points:
        return out
    values = [v for _, v in points]
    out["final_eval_loss"] = ema_smooth(values, EVAL_SMOOTHING_WEIGHT)[-1]
    out["first_eval_loss"], out["last_eval_loss"] = values[0], values[-1]
    out["max_eval_loss"] = max(values)
    rises = [(b - a, step, a) for (_, a), (step, b) in zip(points, points[1:], strict=False)]
    rises = [r for r in rises if r[0] >= max(EVAL_RISE_MIN, EVAL_RISE_REL * r[2])]
    out["eval_rises"] = len(rises)
    if rises:
        out["eval_rise"], out["eval_rise_step"], before = max(rises)
        out["eval_jump"] = out["eval_rise"] >= max(EVAL_JUMP_MIN, EVAL_JUMP_REL * before)
    return out


def _falling(s: dict[str, Any], losses: list[float], evals: list[float]) -> bool:
    """Whether the loss was still falling at the end: each of the last half of the evals (two at least) below
    the one before (the eval set is fixed, so a steady fall there is no noise), or else the means of
    FALLING_CHUNKS chunks of the last half of the training loss one below the other; by at least
    FALLING_MIN of where the run started in all."""
    start = s["start_loss"]
    if start is None:
        return False
    points = evals[-max(2, (len(evals) + 1) // 2) :] if len(evals) >= 2 else []
    if not points:
        half = losses[len(losses) // 2 :]
        if len(half) < 2 * FALLING_CHUNKS:
            return False
        points = _chunk_means(half, FALLING_CHUNKS)
    steady = all(b < a for a, b in zip(points, points[1:], strict=False))
    return steady and points[0] - points[-1] >= FALLING_MIN * abs(start)


def _evidence(s: dict[str, Any], losses: list[float], evals: list[float]) -> tuple[str | None, str | None]:
    """(too-small evidence, too-large evidence): each a clause with the numbers, or None."""
    s["still_falling"] = falling = _falling(s, losses, evals)
    return _too_low_evidence(s, falling), _too_high_evidence(s, falling)


def _too_low_evidence(s: dict[str, Any], falling: bool) -> str | None:
    align, t = s["grad_alignment_mean"], s["grad_alignment_t"]
    if align is not None and t is not None and align >= ALIGNMENT_TOO_LOW and t >= ALIGNMENT_Z and falling:
        return (
            f"each new gradient still pointed the way the last step went (mean alignment {align:+.2f}, "
            f"{t:.0f} standard errors above zero) while the loss kept falling"
        )
    if align is not None:
        return None  # the loss shape alone says less than the alignment: only runs without it use the rules below
    ratio = s["median_update_ratio"]
    first, last, late = s["trend_first_loss"], s["trend_last_loss"], s["last_quarter_drop_frac"]
    if ratio is not None and ratio < UPDATE_RATIO_LOW and first is not None and last >= first:
        return f"the loss barely moved ({first:.4g} to {last:.4g}) with a median update ratio of {ratio:.1e}"
    if late is None or late < SLOW_LAST_QUARTER_DROP or not first:
        return None
    net = (first - last) / abs(first)
    if ratio is not None and ratio >= UPDATE_RATIO_LOW:
        if net >= SLOW_NET_DECREASE:
            return None
        return (
            f"the loss fell only {net:.0%} ({first:.4g} to {last:.4g}) and was still falling steadily "
            f"({late:.0%} of its decrease came in the last quarter)"
        )
    step_size = f"a median update ratio of {ratio:.1e}, far below the usual 1e-3" if ratio else "no update ratio"
    return f"the loss was still falling steadily ({late:.0%} of its decrease came in the last quarter) with {step_size}"


def _too_high_evidence(s: dict[str, Any], falling: bool) -> str | None:
    start, peak = s["start_loss"], s["peak_loss"]
    ratio = s["median_update_ratio"]
    first, last = s["trend_first_loss"], s["trend_last_loss"]
    # The first chunk's batches may just have been easy ones: where there are evals, they must agree.
    worse_on_evals = s["n_evals"] < 2 or s["last_eval_loss"] > s["first_eval_loss"]
    if (
        first is not None and last > first + _chunk_noise(s) and worse_on_evals
        and not (ratio is not None and ratio < UPDATE_RATIO_LOW)
    ):  # fmt: skip
        return f"the loss ended above where it started (mean {last:.4g} over the last 5% of steps against {first:.4g})"
    if start and peak is not None and peak >= (1 + PEAK_RISE) * start:
        return (
            f"the smoothed loss climbed to {peak:.4g} at step {s['peak_step']}, {peak / start:.1f}x the "
            f"{start:.4g} it started at: the first steps jumped across the valley"
        )
    if start and s["max_eval_loss"] is not None and s["max_eval_loss"] >= (1 + PEAK_RISE) * start:
        return f"the eval loss reached {s['max_eval_loss']:.4g}, above the {start:.4g} the run started at"
    if s["eval_rises"] >= EVAL_RISES or s["eval_jump"]:
        times = f" and rose between evals {s['eval_rises']} times" if s["eval_rises"] > 1 else ""
        return (
            f"the eval loss jumped by {s['eval_rise']:.3g} at step {s['eval_rise_step']}{times} on the same "
            "eval set: the steps keep knocking the weights out of the valley"
        )
    align, t, final = s["grad_alignment_mean"], s["grad_alignment_t"], s["final_loss"]
    if (
        align is not None and t is not None and align <= -ALIGNMENT_BOUNCE and t <= -ALIGNMENT_Z and not falling
        and start and final is not None and final >= PLATEAU_MIN * start
    ):  # fmt: skip
        return (
            f"the loss stopped falling at {final:.4g} ({final / start:.0%} of where it started) while each new "
            f"gradient pointed back across the last step (mean alignment {align:+.2f}): the steps bounce"
        )
    rate, threshold, tv = s["sign_change_rate"], s["sign_change_threshold"], s["tv_ratio"]
    if rate is not None and rate >= threshold and (tv is None or tv >= OSCILLATION_MIN_TV_RATIO):
        travel = f"travelling {tv:.0f}x its net decrease" if tv is not None else "with no net decrease"
        return (
            f"the loss rose on {s['rise_fraction']:.0%} of steps and changed direction at {rate:.0%} of them "
            f"(noise alone gives about 67%), {travel}"
        )
    give_back, late = s["end_above_best_frac"], s["last_quarter_drop_frac"]
    if ratio is not None and ratio > UPDATE_RATIO_HIGH and late is not None and late < 0 and _late_rise_is_real(s):
        return (
            f"the loss rose over the last quarter of the run ({-late:.0%} of its decrease given back) with a "
            f"median update ratio of {ratio:.1e}, {ratio / UPDATE_RATIO_TARGET:.0f}x the usual 1e-3"
        )
    if give_back is None or give_back < STALLED_END_ABOVE_BEST:
        return None
    n_spikes = s["spike_count"] + s["grad_spike_count"]
    if n_spikes:
        first_spike = min(s["spike_steps"][:1] + s["grad_spike_steps"][:1])
        return (
            f"the loss or grad norm spiked {n_spikes} times (first at step {first_spike}) and the loss ended "
            f"{give_back:.0%} of its decrease above its best"
        )
    if ratio is not None and ratio > UPDATE_RATIO_HIGH:
        return (
            f"the median update ratio {ratio:.1e} is {ratio / UPDATE_RATIO_TARGET:.0f}x the usual 1e-3 and the "
            f"loss ended {give_back:.0%} of its decrease above its best"
        )
    return None


def _late_rise_is_real(s: dict[str, Any]) -> bool:
    """Whether the last chunk's mean loss rose above the chunk's at three quarters by more than LATE_RISE_Z
    standard errors of a chunk mean (on the best SmolLM2 run it rose 0.04 with a standard error of 0.035)."""
    first, last, late = s["trend_first_loss"], s["trend_last_loss"], s["last_quarter_drop_frac"]
    if None in (first, last, late):
        return False
    return -late * (first - last) > _chunk_noise(s)


def _chunk_noise(s: dict[str, Any]) -> float:
    """LATE_RISE_Z standard errors of the mean loss of one of TREND_CHUNKS chunks (0 when unknown)."""
    noise = s["residual_std"] or 0.0
    return LATE_RISE_Z * noise / math.sqrt(max(1, s["n_losses"] // TREND_CHUNKS))


# --- Verdict --------------------------------------------------------------------------------------


def _verdict(s: dict[str, Any], status: str | None, losses: list[float], evals: list[float]) -> tuple[str | None, str]:
    """The verdict and one plain sentence that gives its reasons with the numbers."""
    reason = _diverged_reason(s, status)
    if reason:
        return "diverged", reason
    if s["n_losses"] < MIN_POINTS_FOR_VERDICT:
        return None, (
            f"Only {s['n_losses']} finite losses were recorded; "
            f"at least {MIN_POINTS_FOR_VERDICT} are needed to judge the step size."
        )
    low, high = _evidence(s, losses, evals)
    if low and high:
        return "inconclusive", f"The signals disagree: {low}, yet {high}. Try a few rates around this one."
    if high:
        return "too_high", f"{_capital(high)}: the step size overshoots."
    if low:
        return "too_low", f"{_capital(low)}: the step size is too small."
    start, final = s["start_loss"], s["final_eval_loss"] if s["final_eval_loss"] is not None else s["final_loss"]
    if start is None or final is None or start - final < FELL_MIN * abs(start):
        return "inconclusive", (
            f"The loss did not fall clearly ({_fmt(start)} to {_fmt(final)}) and nothing says which way to move "
            "the rate: try a few rates around this one."
        )
    return "ok", _ok_reason(s)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def _diverged_reason(s: dict[str, Any], status: str | None) -> str | None:
    final, start = s["final_loss"], s["initial_loss"]
    if s["nonfinite_loss_step"] is not None:
        after = f" after a best smoothed loss of {s['best_loss']:.4g}" if s["best_loss"] is not None else ""
        return f"The loss became non-finite at step {s['nonfinite_loss_step']}{after}: the run diverged."
    if final is not None and start is not None and diverged_loss(final, start, DIVERGED_FINAL_FACTOR):
        return (
            f"The smoothed loss ended at {final:.4g}, {final / start:.1f}x the {start:.4g} it started at: "
            "the run diverged."
        )
    if status == "diverged":
        at = f" with its smoothed loss at {final:.4g} against a start of {start:.4g}" if final is not None else ""
        return f"The trainer stopped the run as diverged{at}."
    return None


def diverged_loss(smoothed: float, start: float, factor: float = DIVERGED_LOSS_FACTOR) -> bool:
    """Whether a smoothed loss is so far above where its run started that the run diverged."""
    return smoothed > factor * start and smoothed - start > DIVERGED_MIN_RISE


def _ok_reason(s: dict[str, Any]) -> str:
    parts = [f"The smoothed loss went from {s['initial_loss']:.4g} to {s['final_loss']:.4g}"]
    if s["t90"] is not None:
        parts.append(f", 90% of the way by step {s['t90']}")
    if s["median_update_ratio"] is not None:
        parts.append(f", with a median update ratio of {s['median_update_ratio']:.1e}")
    n_spikes = s["spike_count"] + s["grad_spike_count"]
    parts.append(" and no spikes" if not n_spikes else f" and {n_spikes} spikes")
    if s["grad_alignment_mean"] is not None:
        parts.append(f"; new gradients neither kept the last step's way nor overshot it much "
                     f"(mean alignment {s['grad_alignment_mean']:+.2f})")  # fmt: skip
    parts.append(": the step size looks right")
    late = s["last_quarter_drop_frac"]
    if late is not None and late >= SLOW_LAST_QUARTER_DROP:
        parts.append(f", though {late:.0%} of the decrease came in the last quarter, so more steps may help")
    return "".join(parts) + "."


def next_rates(verdict: str | None, lr: float | None, alignment: float | None = None) -> list[float]:
    """The rates to try next after a verdict on `lr`, the most likely first.

    Half a decade at a time (the usual spacing of a sweep); a whole decade up when the gradients kept
    their direction strongly (alignment ALIGNMENT_CRAWL or more: the run crawled), and down after a
    divergence. After `ok` the rate itself; after `inconclusive` a small sweep around it.
    """
    if not lr or lr <= 0 or verdict is None:
        return []
    step = math.sqrt(10)
    if verdict == "too_low":
        up = 10.0 if alignment is not None and alignment >= ALIGNMENT_CRAWL else step
        return [_round(lr * up), _round(lr * up * step)]
    if verdict == "too_high":
        return [_round(lr / step), _round(lr / 10)]
    if verdict == "diverged":
        return [_round(lr / 10), _round(lr / 100)]
    if verdict == "inconclusive":
        return [_round(lr / step), _round(lr), _round(lr * step)]
    return [_round(lr)]


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")
