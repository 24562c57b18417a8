"""Services for runs and sweeps: what the API's routes and the dashboard's forms call.

Queueing a run (after checking that its model and dataset exist), a sweep of one run per learning
rate, cancelling and deleting, and the runs list's filters and sort, written once for the API, the
CSV and the page. A queued run is a row: the job runner (`app.runner`) starts it.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sqlalchemy import ColumnElement, delete, update
from sqlmodel import Session, col, select

from analysis.sweeps import summarize_sweep
from app.config import Settings
from app.runner.maps import settle_if_gone, start_map
from app.runner.merges import merge_state, start_merge
from store.landscape import SNAPSHOTS_FILE, map_key, map_runs
from store.merges import has_adapter
from store.tables import (
    FINISHED,
    Dataset,
    EvalMetric,
    Generation,
    LossMap,
    ModuleNorm,
    ProbeCurve,
    Run,
    RunStatus,
    ScalarMetric,
    StepMetric,
    Sweep,
    step_rollups,
    utcnow,
)
from trainer.catalog import BUILTIN_MODELS, ModelError, check_model
from trainer.catalog import _hub_cache_has as hub_cache_has
from trainer.config import ConfigError, TrainConfig, make_config
from trainer.data import BUILTIN_DATASETS, plan_steps, split_sizes

MAX_SWEEP_RUNS = 50


class NotFound(LookupError):
    """No such run (or sweep, or dataset): the API answers 404."""


class Conflict(RuntimeError):
    """The request does not fit the run's state (cancel a finished run, delete a running one): 409."""


class Plan(NamedTuple):
    n_train: int
    updates_per_epoch: int
    total_steps: int


def _under(path: Path, folder: Path) -> bool:
    """Whether `path` names something inside `folder` by its names alone. No '..' at all: after a link
    inside the folder it would climb out of the link's target, which the names do not show."""
    inside = Path(os.path.normpath(path))
    return ".." not in path.parts and any(inside.is_relative_to(f) and inside != f for f in {folder, folder.resolve()})


def check_api_model(spec: str, models_dir: Path | None) -> None:
    """A model a request may name: a built-in, a folder under MODELS_DIR or an id in the local hub cache.

    Any other path gets one message, the same whether or not it exists: a request must not learn what
    is on the server's disk. (`stepscope train` takes any folder: its user owns the machine.) A session
    made by the app carries MODELS_DIR in `info` (`app.deps.get_session`); without it, no folder is allowed.
    """
    if spec in BUILTIN_MODELS:
        check_model(spec)
        return
    path = Path(spec).expanduser()
    if path.is_absolute():
        if models_dir is not None and _under(path, models_dir) and path.is_dir():
            check_model(str(path))  # inside MODELS_DIR, saying what is wrong with a folder is no leak
            return
    elif hub_cache_has(spec):  # an id, never a folder relative to the server's working directory
        return
    raise ModelError(
        f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)}, a model folder under "
        "STEPSCOPE_MODELS_DIR, or a hub id already in the local Hugging Face cache (stepscope never downloads)"
    )


def _plan(session: Session, config: TrainConfig) -> Plan:
    """Check that the model and dataset exist and compute the step plan, or raise ConfigError."""
    try:
        check_api_model(config.model, session.info.get("models_dir"))
    except ModelError as exc:
        raise ConfigError("model", str(exc)) from None
    if config.dataset in BUILTIN_DATASETS:
        n_train = BUILTIN_DATASETS[config.dataset].n_train
    else:
        # Only the generated name of an uploaded dataset: a request never names a path on the server.
        upload = session.exec(select(Dataset).where(Dataset.filename == config.dataset)).first()
        if upload is None:
            raise ConfigError(
                "dataset",
                f"unknown dataset {config.dataset!r}: use a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "or the filename of an uploaded dataset (GET /api/datasets)",
            )
        # The trainer holds out 10% (at most 200) of a file of 10 or more records for eval loss.
        n_rows = upload.n_rows
        n_train = split_sizes(n_rows)[0]
    per_epoch, total = plan_steps(n_train, config.batch_size, config.grad_accum_steps, config.epochs, config.step_limit)
    return Plan(n_train, per_epoch, total)


def _new_run(config: TrainConfig, plan: Plan, sweep_id: int | None, name: str = "") -> Run:
    columns = config.run_columns()
    return Run(**(columns | {"name": name or columns["name"]}), sweep_id=sweep_id, **plan._asdict())


def create_run(session: Session, config: TrainConfig, sweep_id: int | None = None) -> Run:
    """Queue a run; ConfigError (field `model` or `dataset`, and why) if its sources do not exist."""
    run = _new_run(config, _plan(session, config), sweep_id)
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def log_spaced(low: float, high: float, count: int) -> list[float]:
    """`count` learning rates from `low` to `high`, evenly spaced on a log scale (3 significant digits)."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigError("learning_rates", "min and max must be finite numbers with 0 < min <= max")
    if not 1 <= count <= MAX_SWEEP_RUNS:
        raise ConfigError("learning_rates.count", f"must be between 1 and {MAX_SWEEP_RUNS}")
    if count == 1:
        return [float(f"{low:.3g}")]
    ratio = math.log(high / low) / (count - 1)
    return [float(f"{low * math.exp(i * ratio):.3g}") for i in range(count)]


def create_sweep(session: Session, config: TrainConfig, learning_rates: Sequence[float], name: str = "") -> Sweep:
    """A sweep row and one queued run per learning rate (the base config's own rate is ignored)."""
    if config.kind != "train":
        raise ConfigError("config.kind", "a sweep runs 'train' jobs (an lr range test sweeps by itself)")
    if not 1 <= len(learning_rates) <= MAX_SWEEP_RUNS:
        raise ConfigError("learning_rates", f"give between 1 and {MAX_SWEEP_RUNS} learning rates")
    configs = []
    for i, lr in enumerate(learning_rates):
        try:
            configs.append(make_config({**config.model_dump(), "learning_rate": lr}))
        except ConfigError as exc:
            raise ConfigError(f"learning_rates.{i}", exc.reason) from None
    try:
        plan = _plan(session, config)  # checked once, before anything is written
    except ConfigError as exc:
        raise ConfigError(f"config.{exc.field}", exc.reason) from None
    sweep = Sweep(
        name=name or config.name, base_config=config.model_dump(mode="json"), learning_rates=list(learning_rates)
    )
    session.add(sweep)
    session.flush()
    assert sweep.id is not None
    for cfg in configs:
        prefix = sweep.name or f"sweep {sweep.id}"
        session.add(_new_run(cfg, plan, sweep.id, name=f"{prefix} lr={cfg.learning_rate:g}"))
    session.commit()
    session.refresh(sweep)
    return sweep


def sweep_runs(session: Session, sweep_id: int) -> list[Run]:
    return list(session.exec(select(Run).where(Run.sweep_id == sweep_id).order_by(col(Run.id))))


def judge_sweep(session: Session, sweep_id: int) -> dict[str, Any]:
    """Judge the sweep's finished runs against each other and store each compared run's verdict (the `runs`
    column, and `summary["comparative"]` beside the run's own verdict). Called as its runs end."""
    runs = sweep_runs(session, sweep_id)
    result = summarize_sweep(
        [{"id": r.id, "learning_rate": r.learning_rate, "status": r.status, "summary": r.summary} for r in runs]
    )
    judged = {e["id"]: e for e in result["ranking"] if e["rank_loss"] is not None}
    for run in runs:
        entry = judged.get(run.id)
        if entry is None or run.summary is None or len(judged) < 2:
            continue
        compared = {k: entry[k] for k in ("verdict", "reason", "next_lrs")} | {"sweep_id": sweep_id}
        if run.summary.get("comparative") != compared:
            run.summary = {**run.summary, "comparative": compared}
            run.verdict = entry["verdict"]
            session.add(run)
    session.commit()
    return result


def resume_run(session: Session, run_id: int) -> Run:
    """Queue an interrupted run again (NotFound, or Conflict unless it is interrupted). The job runner starts
    it like any queued run, and the trainer goes on from the run's last checkpoint with the same step numbers
    (from step 1 if it has none), writing the steps after the checkpoint again."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status != RunStatus.interrupted:
        raise Conflict(f"run {run_id} is {run.status.value}: only an interrupted run can be resumed")
    fields = {"status": RunStatus.queued, "pid": None, "pid_start": None, "finished_at": None, "error": None}
    done = session.exec(
        update(Run).where(col(Run.id) == run_id, col(Run.status) == RunStatus.interrupted).values(**fields)
    )
    session.commit()
    if done.rowcount != 1:
        raise Conflict(f"run {run_id} changed meanwhile: reload it")
    session.refresh(run)
    return run


def cancel_run(session: Session, run_id: int) -> Run:
    """Cancel a queued or running run (NotFound, or Conflict if it already finished).

    A queued run that no job has picked up yet is cancelled at once; otherwise the request is
    recorded and the runner stops the job within a poll (the run keeps every row it recorded).
    """
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status in FINISHED:
        raise Conflict(f"run {run_id} already finished ({run.status.value})")
    now = utcnow()
    unclaimed = (col(Run.id) == run_id, col(Run.status) == RunStatus.queued, col(Run.pid).is_(None))
    done = session.exec(update(Run).where(*unclaimed).values(status=RunStatus.cancelled, finished_at=now))
    if done.rowcount == 0:
        pending = (col(Run.id) == run_id, col(Run.cancel_requested_at).is_(None))
        session.exec(update(Run).where(*pending).values(cancel_requested_at=now))
    session.commit()
    session.refresh(run)
    return run


def cancel_sweep(session: Session, sweep_id: int) -> list[Run]:
    """Cancel every run of the sweep that has not finished."""
    if session.get(Sweep, sweep_id) is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    for run in sweep_runs(session, sweep_id):
        if run.status not in FINISHED:
            assert run.id is not None
            cancel_run(session, run.id)
    return sweep_runs(session, sweep_id)


def delete_run(session: Session, settings: Settings, run_id: int) -> None:
    """Delete a finished run: its row, its metric rows and its folder (adapter, logs)."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status not in FINISHED:
        raise Conflict(f"run {run_id} is {run.status.value}: cancel it first, only finished runs can be deleted")
    session.exec(delete(StepMetric).where(col(StepMetric.run_id) == run_id))
    session.exec(delete(EvalMetric).where(col(EvalMetric.run_id) == run_id))
    session.exec(delete(step_rollups).where(step_rollups.c.run_id == run_id))
    session.exec(delete(ScalarMetric).where(col(ScalarMetric.run_id) == run_id))
    session.exec(delete(ProbeCurve).where(col(ProbeCurve.run_id) == run_id))
    session.exec(delete(ModuleNorm).where(col(ModuleNorm.run_id) == run_id))
    session.exec(delete(Generation).where(col(Generation.run_id) == run_id))
    session.delete(run)
    session.commit()
    shutil.rmtree(settings.runs_dir / str(int(run_id)), ignore_errors=True)


# --- the runs list's filters and sort (the API, its CSV and the page) --------------------------------------

SORTS = {
    "id": col(Run.id),
    "created_at": col(Run.created_at),
    "started_at": col(Run.started_at),
    "name": col(Run.name),
    "status": col(Run.status),
    "model": col(Run.model),
    "dataset": col(Run.dataset),
    "learning_rate": col(Run.learning_rate),
    "batch_size": col(Run.batch_size),
    "steps_done": col(Run.steps_done),
    "last_loss": col(Run.last_loss),
    "best_loss": col(Run.best_loss),
    "last_eval_loss": col(Run.last_eval_loss),
}
SortKey = Literal[
    "id", "created_at", "started_at", "name", "status", "model", "dataset", "learning_rate", "batch_size",
    "steps_done", "last_loss", "best_loss", "last_eval_loss",
]  # fmt: skip


def runs_filter(
    status: Sequence[RunStatus] | None = None,
    sweep_id: int | None = None,
    name: str | None = None,
    sort: str = "id",
    descending: bool = True,
) -> tuple[list[ColumnElement[bool]], list[Any]]:
    """The WHERE conditions and ORDER BY terms of a runs list (newest first among equals)."""
    filters: list[ColumnElement[bool]] = []
    if status:
        filters.append(col(Run.status).in_(status))
    if sweep_id is not None:
        filters.append(col(Run.sweep_id) == sweep_id)
    if name:
        filters.append(col(Run.name).contains(name, autoescape=True))
    key = SORTS[sort]
    return filters, [key.desc() if descending else key.asc(), col(Run.id).desc()]


# --- loss maps (trainer.maps) ------------------------------------------------------------------------------


def find_map(session: Session, run_ids: list[int], resolution: int | None = None) -> LossMap | None:
    """The map of these runs at this resolution (any, the newest, when None), made or being made (a failed one
    counts as none)."""
    if resolution is not None:
        candidates = session.exec(select(LossMap).where(LossMap.key == map_key(run_ids, resolution))).all()
    else:  # any resolution: the key starts with the runs (store.landscape.map_key)
        query = select(LossMap).where(col(LossMap.key).startswith(map_runs(run_ids), autoescape=True))
        candidates = session.exec(query.order_by(col(LossMap.id).desc())).all()
    return next((m for m in candidates if settle_if_gone(session, m).status != "failed"), None)


def request_map(session: Session, settings: Settings, run_ids: list[int], resolution: int) -> tuple[LossMap, bool]:
    """(the map, whether it was started now): the stored one of the same runs and resolution, else a new
    background job. The runs must exist (NotFound), be finished and have kept snapshots (Conflict)."""
    for run_id in run_ids:
        run = session.get(Run, run_id)
        if run is None:
            raise NotFound(f"no run with id {run_id}")
        if run.status not in FINISHED:
            raise Conflict(f"run {run_id} is {run.status.value}: a map is made of finished runs")
        if not (settings.runs_dir / str(run_id) / SNAPSHOTS_FILE).exists():
            raise Conflict(f"run {run_id} kept no weight snapshots (its map_snapshots was 0, or it never trained)")
    found = find_map(session, run_ids, resolution)
    if found is not None:
        return found, False
    session.exec(delete(LossMap).where(col(LossMap.key) == map_key(run_ids, resolution)))  # a failed one
    loss_map = LossMap(key=map_key(run_ids, resolution), run_ids=run_ids, resolution=resolution)
    session.add(loss_map)
    session.commit()
    session.refresh(loss_map)
    assert loss_map.id is not None
    start_map(settings, loss_map.id)
    return loss_map, True


# --- a run's adapter merged into its base model ---------------------------------------------------------

_merge_lock = threading.Lock()  # two clicks at once start one job (the server is one process)


def request_merge(session: Session, settings: Settings, run_id: int) -> tuple[dict[str, Any], bool]:
    """(the merge's state, whether it was started now): the one made or being made from the run's current
    adapter, else a new background job (also after a failed one). The run must exist (NotFound), be finished
    and have saved an adapter (Conflict)."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status not in FINISHED:
        raise Conflict(f"run {run_id} is {run.status.value}: a merge is made of a finished run's adapter")
    run_dir = settings.runs_dir / str(run_id)
    if not has_adapter(run_dir):
        raise Conflict(f"run {run_id} has no saved adapter ({run.status.value})")
    with _merge_lock:
        state = merge_state(run_dir)
        if state is not None and state["status"] != "failed":
            return state, False
        return start_merge(settings, run_id), True
