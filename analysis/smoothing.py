"""Smoothing of recorded series: TensorBoard's debiased exponential moving average.

The dashboard's charts and every score use this one rule, so a smoothed value shown at a step is the
value the analysis used there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# --- Smoothing ----------------------------------------------------------------------------------
# Debiased-EMA weight. 0.6 is TensorBoard's default. Its window is 1/(1-w) = 2.5 steps and it lags a
# trend by w/(1-w) = 1.5 steps, so the final loss stays honest even on a 50-step run (0.9 or 0.99
# would lag 9 or 99 steps, more than a short run has to spare).
SMOOTHING_WEIGHT = 0.6


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
