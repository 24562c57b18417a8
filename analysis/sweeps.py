"""Sweeps: rank a sweep's runs by their smoothed final loss and recommend a learning rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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
