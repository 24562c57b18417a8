"""The compare page (several runs, coloured by learning rate) and a sweep's page (the same, with its ranking), and
the button of their loss maps (and the run page's)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from sqlmodel import Session, col, select

from analysis.sweeps import summarize_sweep
from app import services
from app.deps import MAX_ID, RunId, SessionDep, SettingsDep
from app.pages.render import CheckedForm, not_found, render, require_sign_in
from app.routers.landscape import DEFAULT_RESOLUTION, MAX_MAP_RUNS, MapCreate
from app.routers.metrics import MAX_COMPARE_RUNS
from store.tables import FINISHED, Run, Sweep

router = APIRouter(dependencies=[Depends(require_sign_in)])


def parse_ids(raw: list[str]) -> list[int]:
    """`ids=1,2&ids=3` -> [1, 2, 3] (the runs list's checkboxes send one `ids` each; links send a list).

    What is not a run id is dropped, and so are ids past the most the compare API serves at once.
    """
    ids: list[int] = []
    for part in ",".join(raw).split(","):
        number = int(part) if part.strip().isdigit() else 0
        if 1 <= number <= MAX_ID and number not in ids:
            ids.append(number)
    return ids[:MAX_COMPARE_RUNS]


def compare_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """What the compare/sweep pages' script needs about each run (JSON embedded in the page)."""
    rows = []
    for r in runs:
        summary = r.summary or {}
        rows.append(
            {
                "id": r.id,
                "name": r.name,
                "lr": r.learning_rate,
                "status": r.status,
                "finished": r.status in FINISHED,
                "final_loss": summary.get("final_loss", r.last_loss),
                "best_loss": summary.get("best_loss", r.best_loss),
            }
        )
    return rows


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request, session: SessionDep, ids: Annotated[list[str] | None, Query()] = None
) -> HTMLResponse:
    wanted = parse_ids(ids or [])
    runs = session.exec(select(Run).where(col(Run.id).in_(wanted))).all() if wanted else []
    runs = sorted(runs, key=lambda r: (r.learning_rate, r.id or 0))
    analysis = sweep_analysis(list(runs)) if len({_budget(r) for r in runs}) == 1 else None
    return render(request, "compare.html", _context(session, runs, None, analysis))


def _budget(run: Run) -> tuple[Any, ...]:
    """What runs must share for their learning rates to be judged against each other: model, data, optimizer
    and step budget (batch, accumulation, steps)."""
    c = run.config
    return (run.model, run.dataset, run.optimizer, run.batch_size, c.get("grad_accum_steps"), run.total_steps)


def sweep_analysis(runs: list[Run]) -> dict[str, Any] | None:
    """The runs judged against each other and the recommended rate, once some of them have their analysis."""
    if not any(r.summary for r in runs):
        return None
    return summarize_sweep(
        [{"id": r.id, "learning_rate": r.learning_rate, "status": r.status, "summary": r.summary} for r in runs]
    )


def _context(
    session: Session, runs: list[Run], sweep: Sweep | None, analysis: dict[str, Any] | None
) -> dict[str, Any]:
    compared = [e for e in (analysis or {}).get("ranking", []) if e["rank_loss"] is not None]
    # Judged against each other only where two or more runs could be compared; else each its own verdict.
    verdicts = {e["id"]: (e["verdict"], e["reason"]) for e in compared} if len(compared) >= 2 else {}
    mapped = [r.id for r in runs if r.id is not None][:MAX_MAP_RUNS]
    return {
        "runs": runs, "rows": compare_rows(runs), "sweep": sweep, "analysis": analysis, "verdicts": verdicts,
        "map": map_context(session, mapped),
    }  # fmt: skip


def map_context(session: Session, run_ids: list[int]) -> dict[str, Any]:
    """What a page's map section needs: the runs it would show, and the stored map of them if there is one."""
    found = services.find_map(session, run_ids) if run_ids else None
    return {"run_ids": run_ids, "id": found.id if found else None,
            "resolution": found.resolution if found else DEFAULT_RESOLUTION}  # fmt: skip


@router.post("/maps", response_model=None)
def make_map(request: Request, session: SessionDep, settings: SettingsDep, form: CheckedForm) -> Response:
    """The map sections' button (its script posts the form and follows the map through GET /api/maps/{id})."""
    try:
        body = MapCreate(run_ids=[int(str(v)) for v in form.getlist("run_id") if str(v).isdigit()],
                         resolution=int(str(form.get("resolution") or DEFAULT_RESOLUTION)))  # fmt: skip
        loss_map, started = services.request_map(session, settings, body.run_ids, body.resolution)
    except (ValidationError, ValueError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        return JSONResponse({"error": reason}, 422)
    except services.NotFound as exc:
        return JSONResponse({"error": str(exc)}, 404)
    except services.Conflict as exc:
        return JSONResponse({"error": str(exc)}, 409)
    return JSONResponse({"id": loss_map.id, "status": loss_map.status}, 202 if started else 200)


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(request: Request, session: SessionDep, sweep_id: RunId) -> HTMLResponse:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        return not_found(request, f"Sweep {sweep_id}")
    runs = session.exec(select(Run).where(Run.sweep_id == sweep_id).order_by(col(Run.learning_rate))).all()
    return render(request, "compare.html", _context(session, list(runs), sweep, sweep_analysis(list(runs))))
