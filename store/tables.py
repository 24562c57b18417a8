"""The recorded data's tables (SQLModel) and their model families (`RunBase` -> `Run`, `RunPublic`).

The trainer writes `runs`, `step_metrics` and `eval_metrics` rows from its own process; the server
reads them. Every change here needs an Alembic revision (a test checks that none is missing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Float, ForeignKey, Integer, Table
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def sqlite_time(moment: datetime) -> str:
    """The text form SQLAlchemy stores for a DateTime in SQLite (for writers that use sqlite3 directly)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    diverged = "diverged"
    interrupted = "interrupted"


FINISHED = {RunStatus.completed, RunStatus.failed, RunStatus.cancelled, RunStatus.diverged, RunStatus.interrupted}

# The per-step metric columns, in the order the trainer records them.
STEP_COLUMNS = (
    "epoch",
    "samples",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "update_norm",
    "param_norm",
    "update_ratio",
    "step_scale",
    "wall_time",
    "step_time",
    "update_cos",
    "grad_alignment",
    "skipped",
)


class SweepBase(SQLModel):
    name: str = Field(default="", max_length=200)


class Sweep(SweepBase, table=True):
    __tablename__ = "sweeps"
    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    base_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    learning_rates: list[float] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class RunBase(SQLModel):
    name: str = Field(default="", max_length=200, index=True)
    kind: str = Field(default="train")
    status: RunStatus = Field(default=RunStatus.queued, index=True)
    model: str = ""
    dataset: str = ""
    learning_rate: float = 0.0
    batch_size: int = 0
    optimizer: str = ""
    sweep_id: int | None = Field(default=None, foreign_key="sweeps.id", index=True)


class Run(RunBase, table=True):
    __tablename__ = "runs"
    id: int | None = Field(default=None, primary_key=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    device: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    """Start time of process `pid` (clock ticks after boot, /proc/PID/stat): with the pid it names one process."""
    cancel_requested_at: datetime | None = None
    """Set by a cancel request; the job runner then stops the job (SIGTERM, then SIGKILL after a grace period)."""
    error: str | None = None
    error_step: int | None = None
    # Plan, known once the data is loaded.
    n_train: int | None = None
    n_eval: int | None = None
    updates_per_epoch: int | None = None
    total_steps: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    # Summary numbers, kept current by the trainer at each flush.
    steps_done: int = 0
    last_loss: float | None = None
    best_loss: float | None = None
    last_eval_loss: float | None = None
    # An external run (kind "external", recorded by a script through the ingest API): its client's last sign of
    # life, and how long it may stay silent before the job runner marks the run interrupted (app.runner.recovery).
    heartbeat_at: datetime | None = None
    heartbeat_seconds: float | None = None
    lora_tensors: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """Names of the trainable tensors, in the order of `module_norms`' lists (trainer.landscape.tensor_names)."""
    # The analysis (scores and verdict) computed when the run ends.
    summary: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    verdict: str | None = None


class RunPublic(RunBase):
    id: int
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    device: str | None
    cancel_requested_at: datetime | None
    error: str | None
    error_step: int | None
    n_train: int | None
    n_eval: int | None
    updates_per_epoch: int | None
    total_steps: int | None
    trainable_params: int | None
    total_params: int | None
    steps_done: int
    last_loss: float | None
    best_loss: float | None
    last_eval_loss: float | None
    summary: dict[str, Any] | None
    verdict: str | None


class StepMetric(SQLModel, table=True):
    """One wide row per run and optimizer step; WITHOUT ROWID keeps a run's steps contiguous on disk."""

    __tablename__ = "step_metrics"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    step: int = Field(primary_key=True)
    # Progress, lr and times are NULL only in rows an external script sent without them (app.routers.ingest).
    epoch: float | None
    samples: int | None
    tokens: int | None
    loss: float | None
    lr: float | None
    grad_norm: float | None
    update_norm: float | None
    param_norm: float | None
    update_ratio: float | None
    step_scale: float | None
    wall_time: float | None
    step_time: float | None
    update_cos: float | None = None
    """cos(Δθ_t, Δθ_{t−1}): −1 when updates bounce across a valley (trainer.measure)."""
    grad_alignment: float | None = None
    """cos(g_t, θ_{t−1} − θ_t): positive, the last step could have been longer; negative, it overshot."""
    skipped: int | None = None
    """1 when the fp16 loss scaler skipped the update (its gradients overflowed; the update is then 0), else 0."""


ROLLUP_PARTS = ("min", "min_step", "max", "max_step")
"""Per metric column and rollup block: the smallest and largest value and the (first) step holding each."""

step_rollups = Table(
    "step_rollups",
    SQLModel.metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("block", Integer, primary_key=True),
    Column("first_step", Integer, nullable=False),
    Column("last_step", Integer, nullable=False),
    *(
        Column(f"{c}_{part}", Integer if part.endswith("step") else Float)
        for c in STEP_COLUMNS
        for part in ROLLUP_PARTS
    ),
    sqlite_with_rowid=False,
)
"""Each block of consecutive steps of a run summed up for downsampled reads (store.rollups keeps it current).

Block `b` of level `l` holds steps `b * size .. (b + 1) * size - 1` (sizes in store.rollups.ROLLUP_BLOCKS).
A plain table, not a SQLModel class: its 53 columns are generated and no row is ever built as an object.
"""


class ScalarMetric(SQLModel, table=True):
    """Any other scalar a script logs (accuracy, reward, a custom norm), one narrow row per run, key and step.

    The standard columns stay in the wide `step_metrics` (fast to read and roll up); these keys are
    open-ended, so a new one needs no migration. WITHOUT ROWID keeps one key's steps of a run contiguous.
    """

    __tablename__ = "scalar_metrics"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    key: str = Field(primary_key=True)
    step: int = Field(primary_key=True)
    value: float | None


class EvalMetric(SQLModel, table=True):
    __tablename__ = "eval_metrics"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    step: int = Field(primary_key=True)
    eval_loss: float | None
    wall_time: float


class ProbeCurve(SQLModel, table=True):
    """The cross-section of one step (trainer.landscape): the probe batch's loss at θ_before + α·Δθ."""

    __tablename__ = "probe_curves"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    step: int = Field(primary_key=True)
    alphas: list[float] = Field(sa_column=Column(JSON, nullable=False))
    losses: list[float | None] = Field(sa_column=Column(JSON, nullable=False))
    best_alpha: float | None = None
    """Where along the step the loss was lowest, as a fraction of the step (analysis.landscape.best_alpha)."""


class ModuleNorm(SQLModel, table=True):
    """Per LoRA tensor (in the order of the run's `lora_tensors`), the update and weight norms at one step."""

    __tablename__ = "module_norms"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    step: int = Field(primary_key=True)
    update_norms: list[float | None] = Field(sa_column=Column(JSON, nullable=False))
    param_norms: list[float | None] = Field(sa_column=Column(JSON, nullable=False))


class LossMap(SQLModel, table=True):
    """A loss map of some runs' paths (trainer.maps), made in the background and kept for reuse.

    `key` names what it was made of (the sorted run ids and the resolution), so asking again for the same map
    returns this one instead of computing it twice.
    """

    __tablename__ = "loss_maps"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=1000)
    run_ids: list[int] = Field(sa_column=Column(JSON, nullable=False))
    resolution: int
    status: str = Field(default="queued")  # queued | running | completed | failed
    progress: float = 0.0
    error: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class DatasetBase(SQLModel):
    name: str = Field(max_length=200, index=True)
    format: str = ""
    n_rows: int = 0
    size_bytes: int = 0


class Dataset(DatasetBase, table=True):
    """An uploaded dataset; the file lives under HOME/datasets with a generated name."""

    __tablename__ = "datasets"
    id: int | None = Field(default=None, primary_key=True)
    filename: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class DatasetPublic(DatasetBase):
    id: int
    created_at: datetime


class Generation(SQLModel, table=True):
    """What a run answered to one of its fixed held-out prompts at an eval step (trainer.generate), scored against
    the expected completion where the dataset has one. A few prompts per eval step: small next to the steps."""

    __tablename__ = "generations"
    __table_args__ = {"sqlite_with_rowid": False}
    run_id: int = Field(foreign_key="runs.id", primary_key=True)
    step: int = Field(primary_key=True)
    prompt_index: int = Field(primary_key=True)
    prompt: str
    expected: str | None = None
    output: str
    exact: bool | None = None
    overlap: float | None = None
