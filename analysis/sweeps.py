"""Judging learning rates against each other: a sweep (or any set of comparable runs) ranked by final loss.

A run on its own can only be judged by the evidence of its own steps (`analysis.runs`); beside other
rates on the same model, data and step budget it can be judged by what matters: which rate got the
lowest loss. The runs are ranked by their smoothed final eval loss (the training loss where a run
has no eval); those within a noise band of the best are `ok`, the others `too_low` or `too_high` by
the side of the best rate they lie on, and `diverged` stays. Every verdict says which comparison it
rests on, and the sweep proposes the rates to try next.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from analysis.runs import next_rates

# Only a run that finished normally has a final loss comparable with its siblings'.
COMPARABLE_STATUSES = (None, "completed")
# The noise band: a run is as good as the best when its loss is within 2 combined standard errors of the
# best's (each run's own, from the spread of its training loss about its smoothed curve, carried over to
# the eval loss in proportion), and never closer than 5% of the best: below that two seeds of one setting
# differ anyway (bench/results/verdicts.md).
BAND_Z = 2.0
BAND_MIN_REL = 0.05
# A sweep whose best rate is its highest (or lowest) tried should go on past it: by half a decade and a decade.
EDGE_STEPS = (math.sqrt(10), 10.0)


def _entry(run: Mapping[str, Any]) -> dict[str, Any]:
    summary = run.get("summary") or {}
    return {
        "id": run["id"],
        "learning_rate": run["learning_rate"],
        "status": run.get("status"),
        "final_loss": summary.get("final_loss"),
        "final_eval_loss": summary.get("final_eval_loss"),
        "solo_verdict": summary.get("verdict"),
        "solo_reason": summary.get("reason"),
        "verdict": summary.get("verdict"),
        "reason": summary.get("reason"),
        "next_lrs": summary.get("next_lrs") or [],
        "_se_rel": _relative_se(summary),
    }


def _relative_se(summary: Mapping[str, Any]) -> float:
    """The standard error of a run's smoothed final training loss, as a fraction of it (0 if unknown)."""
    se, final = summary.get("final_loss_se"), summary.get("final_loss")
    if se is None or not final or not math.isfinite(se):
        return 0.0
    return abs(se / final)


def _diverged(e: dict[str, Any]) -> bool:
    return e["status"] == "diverged" or e["solo_verdict"] == "diverged"


def summarize_sweep(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rank comparable runs by final loss, judge each rate against the best, and recommend one.

    Each run is a mapping with `id`, `learning_rate`, `status` and `summary` (`summarize_run`'s
    result, or None). The ranking uses the eval loss when every comparable run has one, else the
    training loss. Runs still going, cancelled or failed keep their own verdict and rank after the
    compared ones; diverged runs rank last.
    """
    entries = [_entry(run) for run in runs]
    compared = [e for e in entries if e["status"] in COMPARABLE_STATUSES and not _diverged(e)]
    metric = "final_eval_loss" if compared and all(e["final_eval_loss"] is not None for e in compared) else "final_loss"
    compared = [e for e in compared if e[metric] is not None]
    for e in entries:
        e["rank_loss"] = e[metric] if e in compared else None
    best = min(compared, key=lambda e: (e[metric], e["learning_rate"])) if compared else None
    if best is not None and len(compared) >= 2:
        for e in compared:
            _judge(e, best, metric)
    entries.sort(key=lambda e: _rank_key(e, compared, metric))
    for rank, e in enumerate(entries, 1):
        e["rank"] = rank
        e.pop("_se_rel")
    ok_lrs = [e["learning_rate"] for e in compared if e["verdict"] == "ok"]
    edge = _edge(best, compared + [e for e in entries if _diverged(e)])
    result: dict[str, Any] = {
        "ranking": entries,
        "rank_metric": "eval_loss" if metric == "final_eval_loss" else "loss",
        "recommended_lr": best["learning_rate"] if best else None,
        "recommended_run_id": best["id"] if best else None,
        "ok_range": [min(ok_lrs), max(ok_lrs)] if ok_lrs else None,
        "edge": edge,
        "next_lrs": _edge_rates(best, edge),
    }
    result["sentence"] = _sweep_sentence(result, entries, compared, metric)
    return result


def _band(e: dict[str, Any], best: dict[str, Any], metric: str) -> float:
    se = math.hypot(e["_se_rel"] * e[metric], best["_se_rel"] * best[metric])
    return max(BAND_Z * se, BAND_MIN_REL * abs(best[metric]))


def _judge(e: dict[str, Any], best: dict[str, Any], metric: str) -> None:
    """Give a compared run its verdict against the best one, with a reason citing both losses."""
    what = "eval loss" if metric == "final_eval_loss" else "smoothed loss"
    loss, low = e[metric], best[metric]
    if e is best:
        e["verdict"] = "ok"
        e["reason"] = f"The lowest {what} of the rates compared here ({loss:.4g}): the step size is right."
        e["next_lrs"] = [e["learning_rate"]]
        return
    at = f"{low:.4g} at lr {best['learning_rate']:.3g}, the best here"
    if loss - low <= _band(e, best, metric):
        e["verdict"] = "ok"
        e["reason"] = f"{what.capitalize()} {loss:.4g} against {at}: as good within the noise."
        e["next_lrs"] = [e["learning_rate"]]
        return
    if e["learning_rate"] == best["learning_rate"]:
        return  # the same rate with another seed or setting: the comparison says nothing about the rate
    side = "too_low" if e["learning_rate"] < best["learning_rate"] else "too_high"
    e["verdict"] = side
    size = "small" if side == "too_low" else "large"
    e["reason"] = f"{what.capitalize()} {loss:.4g} against {at}: the step size is too {size}."
    e["next_lrs"] = [best["learning_rate"], *next_rates(side, e["learning_rate"])[:1]]


def _rank_key(e: dict[str, Any], compared: list[dict[str, Any]], metric: str) -> tuple[int, float, float]:
    if e in compared:
        return (0, e[metric], e["learning_rate"])
    loss = e["final_loss"]
    return (2 if _diverged(e) or loss is None else 1, math.inf if loss is None else loss, e["learning_rate"])


def _edge(best: dict[str, Any] | None, tried: list[dict[str, Any]]) -> str | None:
    """Return "high" or "low" when the best rate is the highest or lowest one tried (a diverged run above the
    best says the rates beyond it are no better, so it counts as tried)."""
    lrs = {e["learning_rate"] for e in tried}
    if best is None or len(lrs) < 2:
        return None
    if best["learning_rate"] == max(lrs):
        return "high"
    return "low" if best["learning_rate"] == min(lrs) else None


def _edge_rates(best: dict[str, Any] | None, edge: str | None) -> list[float]:
    if best is None or edge is None:
        return []
    lr = best["learning_rate"]
    return [float(f"{lr * f:.3g}") if edge == "high" else float(f"{lr / f:.3g}") for f in EDGE_STEPS]


def _sweep_sentence(
    result: dict[str, Any], entries: list[dict[str, Any]], compared: list[dict[str, Any]], metric: str
) -> str:
    if result["recommended_lr"] is None:
        judged = [e for e in entries if e["verdict"] is not None]
        if judged and all(e["verdict"] in ("too_high", "diverged") for e in judged):
            lowest = min(e["learning_rate"] for e in judged)
            return (
                f"No rate can be recommended: all {len(judged)} judged runs overshot or diverged, "
                f"so try rates below {lowest:.3g}."
            )
        return "No rate can be recommended yet: no run has finished without diverging."
    best = next(e for e in entries if e["id"] == result["recommended_run_id"])
    what = "eval loss" if metric == "final_eval_loss" else "smoothed final loss"
    text = (
        f"Recommended learning rate {best['learning_rate']:.3g} (run {best['id']}): the lowest {what}, "
        f"{best[metric]:.4g}, of {len(compared)} completed runs"
    )
    if result["ok_range"]:
        low, high = result["ok_range"]
        text += f"; rates {low:.3g} to {high:.3g} were as good within the noise" if low != high else ""
    rates = " and ".join(f"{lr:.3g}" for lr in result["next_lrs"])
    if result["edge"] == "high":
        text += f"; it is the highest rate tried, so a higher one may do better: try {rates}"
    elif result["edge"] == "low":
        text += f"; it is the lowest rate tried, so a lower one may do better: try {rates}"
    return text + "."
