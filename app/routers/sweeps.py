"""/api/sweeps: learning-rate sweeps, one queued run per rate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from sqlalchemy import func
from sqlmodel import SQLModel, col, select

from analysis.sweeps import summarize_sweep
from app.deps import MAX_ID, DbDep, ExecutorReady, SessionDep
from app.routers.runs import Verdict, run_summary
from app.security import TokenDep
from app.services import MAX_SWEEP_RUNS, NotFound, cancel_sweep, create_sweep, log_spaced, sweep_runs
from store.tables import RunPublic, RunStatus, Sweep, SweepBase
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


class RankedRun(BaseModel):
    id: int
    learning_rate: float
    status: RunStatus | None
    final_loss: float | None = Field(description="Smoothed training loss at the run's last step")
    final_eval_loss: float | None = Field(None, description="Smoothed eval loss at the run's last eval")
    rank_loss: float | None = Field(None, description="The loss it was ranked by (null: not compared)")
    verdict: Verdict | None = Field(description="Judged against the best rate (its own verdict if not compared)")
    reason: str | None = Field(None, description="The verdict's reason, citing the comparison")
    solo_verdict: Verdict | None = Field(None, description="The run's verdict on its own steps' evidence")
    solo_reason: str | None = None
    next_lrs: list[float] = Field(default_factory=list, description="The rates to try next, the most likely first")
    rank: int = Field(description="1 is the lowest final loss; runs not compared, then diverged runs, rank last")


class SweepSummary(BaseModel):
    """The sweep's runs ranked, and the learning rate to use (`analysis.sweeps.summarize_sweep`)."""

    sweep_id: int
    live: bool = Field(description="True while some runs are going: their scores are computed from their steps so far")
    ranking: list[RankedRun]
    rank_metric: Literal["eval_loss", "loss"] = Field(
        description="What the runs were ranked by: the eval loss when every compared run has one, else the loss"
    )
    recommended_lr: float | None = Field(description="The rate of the completed run with the lowest final loss")
    recommended_run_id: int | None
    ok_range: list[float] | None = Field(description="[lowest, highest] rate of the runs as good as the best")
    edge: Literal["high", "low"] | None = Field(
        description="The recommended rate is the highest or lowest tried: the best may lie beyond it"
    )
    next_lrs: list[float] = Field(default_factory=list, description="At an edge: the rates to try beyond it")
    sentence: str = Field(description="The recommendation in words")


def sweep_public(session: SessionDep, sweep: Sweep) -> SweepPublic:
    assert sweep.id is not None
    runs = [RunPublic.model_validate(r) for r in sweep_runs(session, sweep.id)]
    return SweepPublic.model_validate(sweep, update={"runs": runs})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic, dependencies=[ExecutorReady])
def create(body: SweepCreate, session: SessionDep) -> SweepPublic:
    """Queue one run per learning rate, all with the base config otherwise."""
    return sweep_public(session, create_sweep(session, body.config, body.rates(), name=body.name))


@router.get("", response_model=SweepsPublic)
def list_sweeps(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> SweepsPublic:
    count = session.exec(select(func.count()).select_from(Sweep)).one()
    sweeps = session.exec(select(Sweep).order_by(col(Sweep.id).desc()).offset(offset).limit(limit))
    return SweepsPublic(data=[sweep_public(session, s) for s in sweeps], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic)
def read_sweep(sweep_id: SweepId, session: SessionDep) -> SweepPublic:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    return sweep_public(session, sweep)


@router.post("/{sweep_id}/cancel", response_model=SweepPublic)
def cancel(sweep_id: SweepId, session: SessionDep) -> SweepPublic:
    """Cancel every run of the sweep that has not finished."""
    cancel_sweep(session, sweep_id)
    return read_sweep(sweep_id, session)


@router.get("/{sweep_id}/summary", response_model=SweepSummary)
def read_summary(sweep_id: SweepId, session: SessionDep, db: DbDep) -> dict[str, Any]:
    """Rank the sweep's runs by final loss (eval loss where they have it), judge each rate against the best,
    and recommend one. Finished runs count with the analysis stored when they ended; runs still going with
    scores computed now (`live`), though only completed runs are compared and recommended."""
    if session.get(Sweep, sweep_id) is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    entries, live = [], False
    for run in sweep_runs(session, sweep_id):
        summary, run_live = run_summary(db, run)
        live = live or run_live
        entries.append({"id": run.id, "learning_rate": run.learning_rate, "status": run.status, "summary": summary})
    return {**summarize_sweep(entries), "sweep_id": sweep_id, "live": live}
