"""/api/sweeps: learning-rate sweeps, one queued run per rate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from sqlalchemy import func
from sqlmodel import SQLModel, col, select

from app.deps import MAX_ID, SessionDep
from app.jobs import MAX_SWEEP_RUNS, NotFound, cancel_sweep, create_sweep, log_spaced, sweep_runs
from app.models import RunPublic, Sweep, SweepBase
from app.security import TokenDep
from trainer.config import TrainConfig

router = APIRouter(prefix="/api/sweeps", tags=["sweeps"], dependencies=[TokenDep])

PositiveRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
SweepId = Annotated[int, Path(ge=1, le=MAX_ID, description="The sweep's id")]


class LogRange(BaseModel):
    """`count` rates from `min` to `max`, evenly spaced on a log scale."""

    model_config = ConfigDict(extra="forbid")
    min: PositiveRate
    max: PositiveRate
    count: int = Field(ge=1, le=MAX_SWEEP_RUNS)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if self.min > self.max:
            raise ValueError("min must not be above max")
        return self


def _rates_shape(value: Any) -> str:
    return "list" if isinstance(value, list) else "range"


# Tagged, so that an error names `learning_rates.list.1` or `learning_rates.range.min`.
Rates = Annotated[
    Annotated[list[PositiveRate], Field(min_length=1, max_length=MAX_SWEEP_RUNS), Tag("list")]
    | Annotated[LogRange, Tag("range")],
    Discriminator(_rates_shape),
]


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=200, description="Sweep name (its runs are named '<name> lr=<rate>').")
    config: TrainConfig = Field(
        default_factory=TrainConfig, description="The base config; its learning_rate is ignored."
    )
    learning_rates: Rates = Field(
        description="The rates to try: a list, or {'min', 'max', 'count'} for log-spaced rates."
    )

    def rates(self) -> list[float]:
        lrs = self.learning_rates
        return list(lrs) if isinstance(lrs, list) else log_spaced(lrs.min, lrs.max, lrs.count)


class SweepPublic(SweepBase):
    id: int
    created_at: datetime
    base_config: dict[str, Any]
    learning_rates: list[float]
    runs: list[RunPublic]


class SweepsPublic(SQLModel):
    data: list[SweepPublic]
    count: int


def _public(session: SessionDep, sweep: Sweep) -> SweepPublic:
    assert sweep.id is not None
    runs = [RunPublic.model_validate(r) for r in sweep_runs(session, sweep.id)]
    return SweepPublic.model_validate(sweep, update={"runs": runs})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic)
def create(body: SweepCreate, session: SessionDep) -> SweepPublic:
    """Queue one run per learning rate, all with the base config otherwise."""
    return _public(session, create_sweep(session, body.config, body.rates(), name=body.name))


@router.get("", response_model=SweepsPublic)
def list_sweeps(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> SweepsPublic:
    count = session.exec(select(func.count()).select_from(Sweep)).one()
    sweeps = session.exec(select(Sweep).order_by(col(Sweep.id).desc()).offset(offset).limit(limit))
    return SweepsPublic(data=[_public(session, s) for s in sweeps], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic)
def read_sweep(sweep_id: SweepId, session: SessionDep) -> SweepPublic:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    return _public(session, sweep)


@router.post("/{sweep_id}/cancel", response_model=SweepPublic)
def cancel(sweep_id: SweepId, session: SessionDep) -> SweepPublic:
    """Cancel every run of the sweep that has not finished."""
    cancel_sweep(session, sweep_id)
    return read_sweep(sweep_id, session)


# The integrator adds GET /{sweep_id}/summary here: app.analysis.summarize_sweep(runs).
