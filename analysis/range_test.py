"""LR range tests: the stop rule and the suggested learning rates (steepest slope, fastai's valley).

Pure functions of plain lists, like the rest of `analysis`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from analysis.smoothing import DebiasedEma

# --- LR range test ------------------------------------------------------------------------------
# fastai smooths with 0.98 over a 100-iteration test, a lag of ~49 iterations (4 decades of lr when
# 100 steps span 8); 0.9 lags ~9 iterations.
RANGE_TEST_SMOOTHING = 0.9
# fastai's LRFinder stops once the smoothed loss exceeds 4x its best (`stop_div`).
RANGE_TEST_STOP_FACTOR = 4.0
# fastai's lr_find drops the first num_it // 10 points before suggesting: the EMA has barely
# started averaging there.
RANGE_TEST_SKIP_START_FRACTION = 0.1
# fastai's "minimum" suggestion: a tenth of the rate at the smoothed loss's minimum.
MINIMUM_RULE_DIVISOR = 10.0


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
    - `valley_lr`: fastai's "valley" rule (see `_valley_index`).
    `suggested_lr` is a tenth of `min_loss_lr` (fastai's "minimum" rule; falling back on `steepest_lr`)
    and `sweep_lrs` five rates around it, from a tenth of it up to `min_loss_lr` itself.

    Why the minimum rule: a range test is an upper-bound probe. Its rate grows every step, so where its
    loss bottoms out is where steps start to be too large for this model and data, and a constant rate
    that trains well lies below that. On the default model (SmolLM2, AdamW, batch 8) the minimum came at
    5.5e-3 and a sweep's best rate was 1e-3: a tenth of the minimum (5.5e-4) is within half a decade of
    it, the steepest-slope rule (4.0e-4) is at the edge, the valley rule (1.1e-4) a decade too low
    (bench/results/verdicts.md). The sweep then spans the two decades below the upper bound, never above it.
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
    # A minimum at the first point means the loss never fell over the range: nothing to suggest.
    upper = result["min_loss_lr"] if indices["min_loss"] else None
    suggested = float(f"{upper / MINIMUM_RULE_DIVISOR:.3g}") if upper is not None else result["steepest_lr"]
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
