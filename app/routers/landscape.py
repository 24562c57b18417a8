"""The walk down the mountain: a run's cross-sections of its steps, which of its modules moved, and loss maps
of several runs' paths (made in the background by trainer.maps, kept and reused)."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel, Field, field_validator
from sqlmodel import SQLModel

from analysis.landscape import read_stride, typical_alpha
from app.deps import MAX_ID, DbDep, RunId, SessionDep, SettingsDep
from app.routers.runs import get_run
from app.runner.maps import settle_if_gone
from app.security import TokenDep
from app.services import NotFound, request_map
from store.landscape import read_module_norms, read_probes
from store.tables import LossMap

router = APIRouter(prefix="/api", tags=["landscape"], dependencies=[TokenDep])

MAX_MAP_RUNS = 12
"""Runs on one map: a sweep's worth (the form's sweeps have up to 12 rates); more paths are unreadable."""
MapId = Annotated[int, Path(ge=1, le=MAX_ID, description="The map's id")]
DEFAULT_RESOLUTION = 21
"""Grid points per side: 441 probe evaluations, about a minute for the default model on two CPU cores."""


class ProbePublic(BaseModel):
    step: int
    losses: list[float | None]
    best_alpha: float | None
    reading: str


class ProbesPublic(BaseModel):
    run_id: int
    alphas: list[float]
    """The points along each step that were probed (0: where the step started, 1: where it landed)."""
    probes: list[ProbePublic]
    typical_alpha: float | None
    """The median best α over the second half of the probes."""
    reading: str | None


class ModulesPublic(BaseModel):
    run_id: int
    tensors: list[str]
    layers: list[int | None]
    modules: list[str]
    matrices: list[str]
    """`A` or `B` per tensor."""
    steps: list[int]
    update_norms: list[list[float | None]]
    param_norms: list[list[float | None]]
    update_ratios: list[list[float | None]]
    """update norm / weight norm per step and tensor (null while a weight is zero, as LoRA's B starts)."""


@router.get("/runs/{run_id}/probes", response_model=ProbesPublic)
def run_probes(run_id: RunId, session: SessionDep, db: DbDep) -> ProbesPublic:
    """The probe curves of a run: the probe batch's loss along each probed step, and where it was lowest."""
    get_run(session, run_id)
    rows = read_probes(db, run_id)
    typical = typical_alpha([r["best_alpha"] for r in rows])
    return ProbesPublic(
        run_id=run_id,
        alphas=rows[0]["alphas"] if rows else [],
        probes=[
            ProbePublic(**{k: r[k] for k in ("step", "losses", "best_alpha")}, reading=read_stride(r["best_alpha"]))
            for r in rows
        ],  # fmt: skip
        typical_alpha=typical,
        reading=read_stride(typical, steps="its steps") if rows else None,
    )


@router.get("/runs/{run_id}/probes.csv", responses={200: {"content": {"text/csv": {}}}})
def run_probes_csv(run_id: RunId, session: SessionDep, db: DbDep) -> Response:
    """The probe curves as CSV: step, best_alpha and the loss at each α."""
    get_run(session, run_id)
    rows = read_probes(db, run_id)
    out = io.StringIO()
    writer = csv.writer(out)
    alphas = rows[0]["alphas"] if rows else []
    writer.writerow(["step", "best_alpha", *(f"loss_at_{a:g}" for a in alphas)])
    for r in rows:
        writer.writerow([r["step"], "" if r["best_alpha"] is None else r["best_alpha"],
                         *("" if v is None else v for v in r["losses"])])  # fmt: skip
    return Response(out.getvalue(), media_type="text/csv")


@router.get("/runs/{run_id}/modules", response_model=ModulesPublic)
def run_modules(run_id: RunId, session: SessionDep, db: DbDep) -> dict[str, Any]:
    """Per LoRA tensor (layer, module, A or B) and recorded step: update norm, weight norm and their ratio."""
    get_run(session, run_id)
    return {"run_id": run_id, **read_module_norms(db, run_id)}


@router.get("/runs/{run_id}/modules.csv", responses={200: {"content": {"text/csv": {}}}})
def run_modules_csv(run_id: RunId, session: SessionDep, db: DbDep) -> Response:
    """The module norms as CSV, a row per recorded step and LoRA tensor (a long table, as pandas reads it):
    step, tensor, layer, module, matrix, update_norm, param_norm, update_ratio."""
    get_run(session, run_id)
    norms = read_module_norms(db, run_id)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "tensor", "layer", "module", "matrix", "update_norm", "param_norm", "update_ratio"])
    named = list(zip(norms["tensors"], norms["layers"], norms["modules"], norms["matrices"], strict=True))
    for i, step in enumerate(norms["steps"]):
        values = zip(norms["update_norms"][i], norms["param_norms"][i], norms["update_ratios"][i], strict=True)
        for (tensor, layer, module, matrix), numbers in zip(named, values, strict=True):
            writer.writerow([step, tensor, "" if layer is None else layer, module, matrix,
                             *("" if v is None else v for v in numbers)])  # fmt: skip
    return Response(out.getvalue(), media_type="text/csv")


# --- maps ----------------------------------------------------------------------------------------------------


class MapCreate(BaseModel):
    run_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(
        min_length=1, max_length=MAX_MAP_RUNS, description="The runs whose paths the map shows (the first one's start "
        "is the centre)"
    )  # fmt: skip
    resolution: int = Field(DEFAULT_RESOLUTION, ge=5, le=61, description="Grid points per side (odd: the centre is "
                            "the start)")  # fmt: skip

    @field_validator("resolution")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd, so that the grid's centre is the start point")
        return value

    @field_validator("run_ids")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("must not name a run twice")
        return value


class LossMapPublic(SQLModel):
    id: int
    run_ids: list[int]
    resolution: int
    status: str
    progress: float
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    result: dict[str, Any] | None
    """xs, ys and losses[y][x] of the grid; paths (run_id, learning_rate, steps, x, y); explained (the fraction
    of the paths' movement the plane holds); centre_loss (the probe loss at the first run's start)."""


@router.post("/maps", response_model=LossMapPublic, status_code=status.HTTP_202_ACCEPTED)
def create_map(body: MapCreate, session: SessionDep, settings: SettingsDep, response: Response) -> LossMap:
    """Make (in the background) the loss map of finished runs' paths, or return the one already made or being made
    of the same runs at the same resolution (200). Poll `GET /api/maps/{id}` for its progress."""
    loss_map, started = request_map(session, settings, body.run_ids, body.resolution)
    if not started:
        response.status_code = status.HTTP_200_OK
    return loss_map


@router.get("/maps/{map_id}", response_model=LossMapPublic)
def read_map(map_id: MapId, session: SessionDep) -> LossMap:
    """A map: its status and progress while it is made, its grid and paths once it is done."""
    loss_map = session.get(LossMap, map_id)
    if loss_map is None:
        raise NotFound(f"no map with id {map_id}")
    return settle_if_gone(session, loss_map)
