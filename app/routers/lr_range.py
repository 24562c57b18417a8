"""/api/lr-range-tests: LR range tests, and the sweep of five rates around a finished test's suggestion.

A range test is a run of kind `lr_range_test`: its learning rate grows exponentially from `min_lr` to
`max_lr` over `num_steps` steps, and it stops early once the smoothed loss passes 4x its best. When it
ends, its summary (GET /api/runs/{id}/summary) holds the suggested rates (`range_test`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlmodel import Session

from app.deps import ExecutorReady, RunId, SessionDep
from app.routers.sweeps import SweepPublic, sweep_public
from app.security import TokenDep
from app.services import Conflict, NotFound, create_run, create_sweep
from store.tables import Run, RunPublic, RunStatus, Sweep
from trainer.config import RANGE_TEST_STEPS, ConfigError, TrainConfig, make_config

router = APIRouter(prefix="/api/lr-range-tests", tags=["lr range tests"], dependencies=[TokenDep])

Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RangeTestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: TrainConfig = Field(
        default_factory=TrainConfig,
        description="The base config (model, dataset, optimizer, batch size, ...). Its kind, range_min_lr, "
        "range_max_lr and max_steps are set from the fields below; its learning_rate is not used.",
    )
    min_lr: Rate = Field(1e-7, description="The first step's learning rate.")
    max_lr: Rate = Field(1.0, description="The last step's learning rate (above min_lr).")
    num_steps: int = Field(
        RANGE_TEST_STEPS, ge=2, le=100_000, description="Steps from min_lr to max_lr (fewer if the loss blows up)."
    )

    @field_validator("max_lr")
    @classmethod
    def _above_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min_lr")
        if low is not None and value <= low:
            raise ValueError("must be above min_lr")
        return value

    def train_config(self) -> TrainConfig:
        """The run's config: the base config as a range test over these rates and steps."""
        fields = self.config.model_dump() | {
            "kind": "lr_range_test",
            "range_min_lr": self.min_lr,
            "range_max_lr": self.max_lr,
            "max_steps": self.num_steps,
        }
        return make_config(fields | {"name": self.config.name or range_test_name(fields)})


def range_test_name(fields: dict[str, object]) -> str:
    """The generated name of a range test: 'lr range 1e-07 to 1, adamw bs=8'."""
    return (
        f"lr range {fields['range_min_lr']:g} to {fields['range_max_lr']:g}, "
        f"{fields['optimizer']} bs={fields['batch_size']}"
    )


def suggested_sweep(session: Session, run_id: int) -> Sweep:
    """Queue a sweep of the five rates around a completed range test's suggestion, same config otherwise.

    NotFound for no such run; Conflict when it is not a range test, or has no suggestion (yet).
    """
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.kind != "lr_range_test":
        raise Conflict(f"run {run_id} is not an lr range test")
    rates = ((run.summary or {}).get("range_test") or {}).get("sweep_lrs")
    if run.status != RunStatus.completed or not rates:
        why = "has not completed" if run.status != RunStatus.completed else "found no falling stretch of the loss"
        raise Conflict(f"range test {run_id} {why}: there is no suggested learning rate to sweep around")
    base = make_config(run.config | {"kind": "train", "name": ""})
    return create_sweep(session, base, rates, name=f"from range test {run_id}")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic, dependencies=[ExecutorReady])
def create(body: RangeTestCreate, session: SessionDep) -> Run:
    """Queue an LR range test: the learning rate grows exponentially from `min_lr` to `max_lr` over
    `num_steps` steps, stopping early once the smoothed loss passes 4x its best. When it ends, GET
    /api/runs/{id}/summary gives the suggested rate (`range_test.suggested_lr`) by fastai's valley rule,
    with the steepest-descent rate beside it."""
    try:
        return create_run(session, body.train_config())
    except ConfigError as exc:
        raise ConfigError(f"config.{exc.field}", exc.reason) from None


@router.post(
    "/{run_id}/sweep", status_code=status.HTTP_201_CREATED, response_model=SweepPublic, dependencies=[ExecutorReady]
)
def create_suggested_sweep(run_id: RunId, session: SessionDep) -> SweepPublic:
    """Queue a sweep of five rates around a completed range test's suggested rate (its `sweep_lrs`), with
    the test's config otherwise (kind `train`). 409 if the run is not a completed range test with one."""
    return sweep_public(session, suggested_sweep(session, run_id))
