"""Reading the walk down the mountain: where the loss along a step was lowest, and the map's grid.

A probe (trainer.landscape) evaluates the loss at `θ_before + α·Δθ` for a few α around the step taken
(α = 0 is where the step started, α = 1 where it landed). The α of the lowest point says how the stride
fitted the valley: about 1, the step landed near the bottom along its own direction; well below 1, it
crossed the bottom and climbed the other slope (at 0.4 the stride was 2.5x too long); above 1, the loss kept
falling past where it landed (the stride was short). For plain SGD on a quadratic with curvature h along
the step, the lowest point is at α = 1 / (lr·h) exactly, which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PROBE_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
"""Where along a step a probe looks: from one step back to three steps on, every half step (nine forwards
of the probe batch); the lowest point between them is refined by a parabola (`best_alpha`)."""
STRIDE_RIGHT = (0.8, 1.6)
"""Best α within this band reads as a stride that fits. From the default model's AdamW sweep (README, "The walk
down the mountain"): at the sweep's best rate (1e-3) the median best α over the second half of the run was 1.5,
at ten times that rate (eval loss ten times worse) 0.71-0.78 on every probe, at a tenth of it 3 (still falling)."""
FLAT = 1e-6
"""Losses along a step that differ by less than this (relative) are flat: the step moved nothing (an fp16
step the scaler skipped), and the curve has no lowest point to read."""
MAP_MARGIN = 1.25
"""The map's grid reaches this far beyond the farthest point of any path, so every path lies inside it."""


def best_alpha(alphas: Sequence[float], losses: Sequence[float | None]) -> float | None:
    """Where along the step the loss was lowest: the lowest probed point, refined by the parabola through it
    and its two neighbours. At either end of the probed range the end itself (the lowest point may lie
    beyond it). None when a loss is missing or not finite (a diverging step), or the curve is flat."""
    if len(alphas) != len(losses) or len(alphas) < 3:
        raise ValueError("need the same number (at least 3) of alphas and losses")
    ys = [float("nan") if v is None else float(v) for v in losses]
    if not all(math.isfinite(v) for v in ys):
        return None
    if max(ys) - min(ys) <= FLAT * max(1.0, abs(min(ys))):
        return None
    i = min(range(len(ys)), key=ys.__getitem__)
    if i in (0, len(ys) - 1):
        return float(alphas[i])
    (x0, x1, x2), (y0, y1, y2) = alphas[i - 1 : i + 2], ys[i - 1 : i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:  # flat: no curvature to refine with
        return float(x1)
    return float(min(max(-b / (2 * a), x0), x2))


def read_stride(alpha: float | None, steps: str = "this step") -> str:
    """One sentence on what a probe's best α says about the step's length (`steps`: of which step or steps)."""
    if alpha is None:
        return f"The loss along {steps} was not finite."
    if alpha <= 0:
        return (
            f"The lowest point along {steps} was at {alpha:.2g} of it, behind where it started: "
            "on the probe batch the step went uphill."
        )
    low, high = STRIDE_RIGHT
    if alpha < low:
        return (
            f"The lowest point along {steps} was at {alpha:.2g} of the step taken: "
            f"the stride was {1 / alpha:.2g}x too long."
        )
    if alpha >= PROBE_ALPHAS[-1]:
        return (
            f"The loss was still falling at {alpha:.2g} times {steps}, the farthest point probed: "
            f"the stride was at least {alpha:.2g}x too short."
        )
    if alpha > high:
        return (
            f"The lowest point along {steps} was at {alpha:.2g} of the step taken: "
            f"a stride {alpha:.2g}x as long would have gone further down."
        )
    return f"The lowest point along {steps} was at {alpha:.2g} of the step taken: the stride fitted."


def typical_alpha(alphas: Sequence[float | None]) -> float | None:
    """The median best α over the second half of a run's probes (the first steps are a transient)."""
    values = [a for a in alphas[len(alphas) // 2 :] if a is not None]
    return float(np.median(values)) if values else None


def grid_axes(coords: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The map's x and y values: `resolution` (odd) points each, symmetric around 0 so that the grid's centre
    is the start point, reaching MAP_MARGIN beyond the farthest path point on each axis."""
    if resolution < 3 or resolution % 2 == 0:
        raise ValueError("resolution must be an odd number of at least 3")
    reach = np.abs(coords).max(axis=0) if len(coords) else np.zeros(2)
    reach = np.where(reach > 0, reach * MAP_MARGIN, 1.0)  # a path that never moved still gets a unit square
    return np.linspace(-reach[0], reach[0], resolution), np.linspace(-reach[1], reach[1], resolution)
