"""The dashboard's HTML pages: runs list, new-run form, run page (with an LR range test's chart and its
one-click sweep), compare page and sweep page.

Pages are rendered here; their charts fetch data from the JSON API (see static/*.js), so a page
load never waits for metric rows. Every form post carries a CSRF token: a random value in a cookie
that the form must echo in a hidden field (double submit). Another site can make a browser post to
us, but it cannot read our cookie, so it cannot forge the field.
"""

from __future__ import annotations

import math
import re
import secrets
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import Session, col, select
from starlette.datastructures import FormData, UploadFile
from starlette.templating import Jinja2Templates

from app import jobs
from app.analysis import RANGE_TEST_SMOOTHING, summarize_sweep
from app.deps import MAX_ID, RunId, SessionDep, SettingsDep
from app.models import FINISHED, Dataset, Run, RunStatus, Sweep
from app.routers.datasets import save_dataset
from app.routers.lr_range import range_test_name, suggested_sweep
from app.routers.metrics import MAX_COMPARE_RUNS
from app.security import AUTH_COOKIE, auth_cookie_value, signed_in
from trainer.config import RANGE_TEST_STEPS, ConfigError, TrainConfig, field_help

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
CSRF_COOKIE = "stepscope_csrf"
CSRF_FIELD = "csrf_token"
# --- formatting ---------------------------------------------------------------------------------------


def fmt_lr(value: float | None) -> str:
    """A learning rate the way people write them: 3e-4, 1.5e-3 (the JS fmtLr gives the same text)."""
    if value is None or not math.isfinite(value) or value <= 0:
        return "—" if value is None else str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt_num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _aware(moment: datetime) -> datetime:
    """SQLite gives datetimes back without a zone; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def fmt_time(moment: datetime | None) -> str:
    return "—" if moment is None else _aware(moment).strftime("%Y-%m-%d %H:%M UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def run_duration(run: Run) -> float | None:
    if run.started_at is None:
        return None
    end = _aware(run.finished_at) if run.finished_at else datetime.now(UTC)
    return (end - _aware(run.started_at)).total_seconds()


def _make_templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined)
    env.filters.update(lr=fmt_lr, num=fmt_num, time=fmt_time, duration=fmt_duration)
    env.globals.update(run_duration=run_duration, FINISHED=FINISHED)
    return Jinja2Templates(env=env)


templates = _make_templates()


# --- CSRF (double-submit cookie) and sign-in ------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The browser's token (from its cookie), or a new one that `render` will set as the cookie."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
        token = getattr(request.state, "new_csrf", None) or secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    context = {"csrf_token": csrf_token(request), **context}
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    new = getattr(request.state, "new_csrf", None)
    if new:
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="lax", path="/")
    return response


async def checked_form(request: Request) -> FormData:
    """The posted form, after checking that it came from one of our pages."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(403, "Cross-site form posts are refused.")
    form = await request.form()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD)
    if not cookie or not isinstance(sent, str) or not secrets.compare_digest(cookie, sent):
        raise HTTPException(403, "The form's security token is missing or stale: reload the page and submit again.")
    return form


CheckedForm = Annotated[FormData, Depends(checked_form)]


def require_sign_in(request: Request, settings: SettingsDep) -> None:
    """With STEPSCOPE_TOKEN set the pages (and their forms, which start and cancel runs) need a sign-in."""
    if not signed_in(request, settings):
        target = "/login?" + urlencode(
            {"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")}
        )
        raise HTTPException(303, "sign in first", headers={"Location": target})


router = APIRouter(include_in_schema=False)  # what app.main includes: sign-in, plus `pages` below
pages = APIRouter(dependencies=[Depends(require_sign_in)])


def not_found(request: Request, what: str) -> HTMLResponse:
    return render(request, "error.html", {"title": "Not found", "message": f"{what} does not exist."}, 404)


# --- the new-run form's fields ------------------------------------------------------------------------

RANGE_GROUP = "LR range test (kind = lr_range_test)"
FIELD_GROUPS: list[tuple[str, list[str]]] = [
    ("Run", ["name", "model", "dataset", "kind"]),
    ("Optimizer", ["learning_rate", "optimizer", "momentum", "weight_decay", "scheduler", "warmup_steps"]),
    ("Length", ["batch_size", "grad_accum_steps", "epochs", "max_steps", "max_seq_len", "eval_every"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"]),
    ("Stability", ["max_grad_norm", "seed", "device", "precision"]),
    (RANGE_GROUP, ["range_min_lr", "range_max_lr"]),
]
LABELS = {
    "kind": "Kind",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "use_rslora": "rsLoRA scaling",
    "max_steps": "Max steps",
    "max_seq_len": "Max sequence length",
    "grad_accum_steps": "Gradient accumulation steps",
    "max_grad_norm": "Max gradient norm",
    "range_min_lr": "Range: first lr",
    "range_max_lr": "Range: last lr",
}
CHOICE_LABELS = {
    "kind": {
        "train": "train: one run at the learning rate below",
        "lr_range_test": "lr_range_test: find a learning rate (LR range test)",
    },
}


@dataclass
class FormField:
    name: str
    label: str
    widget: str  # "text", "select" or "checkbox"
    value: str
    default: str
    help: str
    inputmode: str = "text"
    choices: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def field_text(value: Any) -> str:
    """How a config value is written in the form (and parsed back by `form_values`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _widget(name: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(widget, inputmode, choices) for a TrainConfig field, from its type."""
    annotation = TrainConfig.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        labels = CHOICE_LABELS.get(name, {})
        return "select", "text", [(str(c), labels.get(str(c), str(c))) for c in typing.get_args(annotation)]
    if annotation is bool:
        return "checkbox", "text", []
    args = set(typing.get_args(annotation)) or {annotation}
    if float in args:
        return "text", "decimal", []
    if int in args:
        return "text", "numeric", []
    return "text", "text", []


def grouped_fields(values: dict[str, str], errors: dict[str, str]) -> list[tuple[str, list[FormField]]]:
    """Every TrainConfig field, grouped for the form, with the user's value, default, help and error."""
    helps = field_help()
    listed = {name for _, names in FIELD_GROUPS for name in names}
    groups = [*FIELD_GROUPS, ("Other", [n for n in helps if n not in listed])]
    out = []
    for title, names in groups:
        fields = []
        for name in names:
            default, description = helps[name]
            widget, inputmode, choices = _widget(name)
            if name == "model":
                widget, choices = "select", model_choices(values.get(name, ""))
            fields.append(
                FormField(
                    name=name,
                    label=LABELS.get(name, name.replace("_", " ").capitalize()),
                    widget=widget,
                    value=values.get(name, field_text(default)),
                    default=field_text(default) if widget != "checkbox" else ("on" if default else "off"),
                    help=description,
                    inputmode=inputmode,
                    choices=choices,
                    error=errors.get(name),
                )
            )
        if fields:
            out.append((title, fields))
    return out


@cache
def builtin_models() -> dict[str, str]:
    from trainer.models import BUILTIN_MODELS  # imports torch: only when a form is first shown

    return dict(BUILTIN_MODELS)


@cache
def builtin_datasets() -> dict[str, tuple[str, int]]:
    """name -> (description, training examples)."""
    from trainer.data import BUILTIN_DATASETS

    return {name: (d.description, d.n_train) for name, d in BUILTIN_DATASETS.items()}


def model_choices(current: str) -> list[tuple[str, str]]:
    choices = [(name, f"{name}") for name in builtin_models()]
    if current and current not in builtin_models():
        choices.append((current, current))
    return choices


@dataclass
class DatasetChoice:
    value: str
    label: str
    n_train: int | None
    description: str


def uploaded_n_train(n_rows: int) -> int:
    """Training examples of an uploaded file: the trainer holds out 10% (at most 200) for eval."""
    from trainer.data import split_sizes

    return split_sizes(n_rows)[0]


def dataset_choices(session: Session, current: str) -> tuple[list[DatasetChoice], list[DatasetChoice]]:
    """(built-in, uploaded) datasets for the select; an unknown current value is kept as an uploaded entry."""
    builtin = [DatasetChoice(n, n, size, desc) for n, (desc, size) in builtin_datasets().items()]
    uploaded = [
        DatasetChoice(d.filename, f"{d.name} ({d.n_rows} rows)", uploaded_n_train(d.n_rows), d.name)
        for d in session.exec(select(Dataset).order_by(col(Dataset.created_at).desc())).all()
    ]
    if current and all(current != c.value for c in builtin + uploaded):
        uploaded.append(DatasetChoice(current, current, None, "a file path"))
    return builtin, uploaded


def plan_text(n_train: int | None, values: dict[str, str]) -> str:
    """'1000 samples at batch size 100 → 10 updates per epoch, 10 total steps' (static/run_form.js updates it)."""
    from trainer.data import plan_steps

    try:
        batch, accum = int(values["batch_size"]), int(values["grad_accum_steps"])
        epochs = float(values["epochs"])
        max_steps = int(values["max_steps"]) if values.get("max_steps", "").strip() else None
        if max_steps is None and values.get("kind") == "lr_range_test":
            max_steps = RANGE_TEST_STEPS  # TrainConfig.step_limit
    except (KeyError, ValueError):
        return ""
    if n_train is None or batch < 1 or accum < 1 or not epochs > 0:
        return ""
    per_epoch, total = plan_steps(n_train, batch, accum, epochs, max_steps)
    at = f"batch size {batch}" + (f" × {accum} accumulation steps" if accum > 1 else "")
    return f"{n_train} samples at {at} → {per_epoch} updates per epoch, {total} total steps"


# --- parsing the posted form --------------------------------------------------------------------------


def form_values(form: FormData) -> dict[str, str]:
    """The posted text of every config field (a missing checkbox is unchecked: '')."""
    out = {}
    for name in TrainConfig.model_fields:
        raw = form.get(name, "")
        out[name] = raw.strip() if isinstance(raw, str) else ""
    return out


def config_input(values: dict[str, str]) -> dict[str, Any]:
    """Form text to the values TrainConfig validates (pydantic parses the numbers and reports bad ones)."""
    data: dict[str, Any] = {}
    for name, text in values.items():
        widget, _, _ = _widget(name)
        if widget == "checkbox":
            data[name] = text not in ("", "off", "false")
        elif name == "target_modules":
            data[name] = [m for m in re.split(r"[,\s]+", text) if m]
        elif text == "" and TrainConfig.model_fields[name].default is None:
            data[name] = None
        else:
            data[name] = text
    return data


def field_errors(exc: ValidationError) -> dict[str, str]:
    """Every problem, keyed by the field it belongs to ('' for ones that name no field)."""
    errors: dict[str, str] = {}
    for err in exc.errors():
        reason = err["msg"].removeprefix("Value error, ")
        name = str(err["loc"][0]) if err["loc"] else ""
        if not name:  # a rule across fields: put it next to the field its message names
            name = next((f for f in TrainConfig.model_fields if re.search(rf"\b{f}\b", reason)), "")
        errors.setdefault(name, reason)
    return errors


def validate_form(values: dict[str, str]) -> tuple[TrainConfig | None, dict[str, str]]:
    try:
        return TrainConfig.model_validate(config_input(values)), {}
    except ValidationError as exc:
        return None, field_errors(exc)


# The sweep's fields (not TrainConfig's) and what the form starts with.
SWEEP_DEFAULTS = {
    "sweep": "",
    "sweep_mode": "list",
    "sweep_lrs": "",
    "sweep_min": "1e-5",
    "sweep_max": "1e-2",
    "sweep_count": "4",
}


def sweep_values(form: FormData) -> dict[str, str]:
    out = {}
    for name, default in SWEEP_DEFAULTS.items():
        raw = form.get(name, default)
        out[name] = raw.strip() if isinstance(raw, str) else ""
    return out


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def sweep_rates(values: dict[str, str]) -> tuple[list[float], dict[str, str]]:
    """The sweep's learning rates (a list, or min/max/count log-spaced), or errors keyed by form field."""
    if values["sweep_mode"] == "range":
        try:
            low = _positive(values["sweep_min"])
        except ValueError:
            return [], {"sweep_min": "must be a number > 0"}
        try:
            high = _positive(values["sweep_max"])
        except ValueError:
            return [], {"sweep_max": "must be a number > 0"}
        if high <= low:
            return [], {"sweep_max": "must be above the lowest rate"}
        count = int(values["sweep_count"]) if values["sweep_count"].isdigit() else 0
        if not 2 <= count <= jobs.MAX_SWEEP_RUNS:
            return [], {"sweep_count": f"must be a whole number from 2 to {jobs.MAX_SWEEP_RUNS}"}
        return jobs.log_spaced(low, high, count), {}
    parts = [p for p in re.split(r"[,\s]+", values["sweep_lrs"]) if p]
    try:
        rates = sorted({_positive(p) for p in parts})
    except ValueError:
        return [], {"sweep_lrs": "write learning rates as numbers > 0, separated by commas (e.g. 1e-4, 3e-4, 1e-3)"}
    if not 2 <= len(rates) <= jobs.MAX_SWEEP_RUNS:
        return [], {"sweep_lrs": f"give from 2 to {jobs.MAX_SWEEP_RUNS} different learning rates"}
    return rates, {}


def service_error_field(exc: ConfigError, sweep: dict[str, str]) -> str:
    """The form field for a ConfigError from app.jobs (`learning_rates.2` is one of the sweep's rates)."""
    name = exc.field.removeprefix("config.")
    if name.endswith(".count"):
        return "sweep_count"
    if name.startswith("learning_rates"):
        return "sweep_min" if sweep["sweep_mode"] == "range" else "sweep_lrs"
    return name


# --- pages --------------------------------------------------------------------------------------------

ANALYSIS_LABELS = [
    ("initial_loss", "Initial loss (smoothed)"),
    ("final_loss", "Final loss (smoothed)"),
    ("best_loss", "Best loss (smoothed)"),
    ("t90", "Step reaching 90% of the drop"),
    ("sign_change_rate", "Direction changes of the loss"),
    ("tv_ratio", "Distance travelled / net drop"),
    ("median_update_ratio", "Median ‖Δw‖/‖w‖"),
    ("median_step_scale", "Median ‖Δw‖/(lr·‖g‖)"),
    ("spike_count", "Loss spikes"),
    ("grad_spike_count", "Gradient-norm spikes"),
]


def dataset_names(session: Session) -> dict[str, str]:
    """Uploaded datasets' stored file names -> the names people gave them."""
    return {d.filename: d.name for d in session.exec(select(Dataset)).all()}


LIST_LIMIT = 500  # rows on the runs list; filters find older ones

SORTS = {
    "name": Run.name,
    "status": Run.status,
    "model": Run.model,
    "dataset": Run.dataset,
    "lr": Run.learning_rate,
    "batch": Run.batch_size,
    "steps": Run.steps_done,
    "last_loss": Run.last_loss,
    "best_loss": Run.best_loss,
    "started": Run.started_at,
    "created": Run.id,
}


@pages.get("/", response_class=HTMLResponse)
def runs_list(
    request: Request,
    session: SessionDep,
    status: str = "",
    q: str = "",
    sort: str = "created",
    order: str = "desc",
) -> HTMLResponse:
    query = select(Run)
    if status in RunStatus.__members__:
        query = query.where(Run.status == RunStatus(status))
    if q:
        query = query.where(col(Run.name).contains(q, autoescape=True))
    column = col(SORTS.get(sort, Run.id))
    query = query.order_by(column.asc() if order == "asc" else column.desc(), col(Run.id).desc())
    runs = session.exec(query.limit(LIST_LIMIT)).all()
    total = session.exec(select(func.count()).select_from(Run)).one()
    context = {
        "runs": runs,
        "total": total,
        "dataset_names": dataset_names(session),
        "statuses": list(RunStatus),
        "limit": LIST_LIMIT,
        "filters": {"status": status, "q": q, "sort": sort if sort in SORTS else "created", "order": order},
    }
    return render(request, "runs.html", context)


def form_page(
    request: Request,
    session: Session,
    values: dict[str, str],
    errors: dict[str, str],
    sweep: dict[str, str],
    note: str = "",
) -> HTMLResponse:
    """The form, filled with `values`; with errors it answers 200 all the same (a 4xx document is a console
    error in the browser, and the page is what the user asked for: the form, with what to change)."""
    builtin, uploaded = dataset_choices(session, values.get("dataset", ""))
    n_train = next((c.n_train for c in builtin + uploaded if c.value == values.get("dataset")), None)
    context = {
        "groups": grouped_fields(values, errors),
        "range_group": RANGE_GROUP,
        "range_test_steps": RANGE_TEST_STEPS,
        "errors": errors,
        "builtin_datasets": builtin,
        "uploaded_datasets": uploaded,
        "models": builtin_models(),
        "plan": plan_text(n_train, values),
        "sweep": sweep,
        "note": note,
    }
    return render(request, "run_form.html", context)


@pages.get("/runs/new", response_class=HTMLResponse)
def new_run_form(
    request: Request,
    session: SessionDep,
    clone: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    dataset: str = "",
) -> HTMLResponse:
    values = {name: field_text(default) for name, (default, _) in field_help().items()}
    note = ""
    if clone is not None:
        source = session.get(Run, clone)
        if source is None:
            return not_found(request, f"Run {clone}")
        values.update({k: field_text(v) for k, v in source.config.items() if k in values})
        values["name"] = ""
        note = f"Cloned from run {clone} ({source.name}): change what you want to try, e.g. the learning rate."
    if dataset:
        values["dataset"] = dataset
    return form_page(request, session, values, {}, sweep_values(FormData()), note=note)


@pages.post("/runs/new", response_class=HTMLResponse, response_model=None)
def new_run_submit(request: Request, session: SessionDep, form: CheckedForm) -> Response:
    values, sweep = form_values(form), sweep_values(form)
    rates: list[float] = []
    sweep_errors: dict[str, str] = {}
    checked = values
    if sweep["sweep"]:  # the sweep's rates replace the single learning rate
        rates, sweep_errors = sweep_rates(sweep)
        checked = values | {"learning_rate": str(rates[0] if rates else field_help()["learning_rate"][0])}
    config, errors = validate_form(checked)
    errors.update(sweep_errors)
    if config is None or errors:
        return form_page(request, session, values, errors, sweep)
    if config.kind == "lr_range_test" and not config.name:
        config.name = range_test_name(config.model_dump())
    try:
        if rates:
            created_sweep = jobs.create_sweep(session, config, rates)
            return RedirectResponse(f"/sweeps/{created_sweep.id}", status_code=303)
        run = jobs.create_run(session, config)
    except ConfigError as exc:
        errors = {service_error_field(exc, sweep): exc.reason}
        return form_page(request, session, values, errors, sweep)
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


@pages.post("/datasets/upload", response_model=None)
def upload_dataset(request: Request, session: SessionDep, settings: SettingsDep, form: CheckedForm) -> Response:
    """Store an uploaded JSONL/CSV file; answer JSON to the form's script, else go back to the form."""
    upload = form.get("file")
    wants_json = "application/json" in request.headers.get("accept", "")
    try:
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise ValueError("choose a JSONL or CSV file first")
        dataset = save_dataset(session, settings, upload.filename, upload.file)
    except ValueError as exc:  # the upload service's DataError and UploadTooLarge are ValueErrors
        if wants_json:
            return JSONResponse({"error": str(exc)}, 422)
        return render(request, "error.html", {"title": "Upload refused", "message": str(exc)}, 422)
    if wants_json:
        label = f"{dataset.name} ({dataset.n_rows} rows)"
        return JSONResponse({"value": dataset.filename, "label": label, "n_train": uploaded_n_train(dataset.n_rows)})
    return RedirectResponse("/runs/new?" + urlencode({"dataset": dataset.filename}), 303)


@pages.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, session: SessionDep, run_id: RunId) -> HTMLResponse:
    run = session.get(Run, run_id)
    if run is None:
        return not_found(request, f"Run {run_id}")
    sweep = session.get(Sweep, run.sweep_id) if run.sweep_id else None
    range_test = (run.summary or {}).get("range_test") if run.kind == "lr_range_test" else None
    page = {
        "id": run.id,
        "kind": run.kind,
        "status": run.status,
        "total_steps": run.total_steps,
        "steps_done": run.steps_done,
        "analysis_labels": ANALYSIS_LABELS,
        "range_test": range_test,
        "range_smoothing": RANGE_TEST_SMOOTHING,
    }
    context = {
        "run": run,
        "sweep": sweep,
        "range_test": range_test,
        "page": page,
        "finished": run.status in FINISHED,
        "dataset_name": dataset_names(session).get(run.dataset, run.dataset),
        "analysis_labels": ANALYSIS_LABELS,
    }
    return render(request, "run.html", context)


@pages.post("/runs/{run_id}/range-sweep", response_model=None)
def range_test_sweep(request: Request, session: SessionDep, run_id: RunId, form: CheckedForm) -> Response:
    """The range test page's button: a sweep of five rates around its suggestion, then the sweep's page."""
    try:
        created = suggested_sweep(session, run_id)
    except jobs.NotFound:
        return not_found(request, f"Run {run_id}")
    except jobs.Conflict as exc:
        return render(request, "error.html", {"title": "No sweep started", "message": str(exc)}, 409)
    except ConfigError as exc:  # the test's config no longer fits (say, its uploaded dataset was deleted)
        return render(request, "error.html", {"title": "No sweep started", "message": str(exc)}, 422)
    return RedirectResponse(f"/sweeps/{created.id}", 303)


@pages.post("/runs/{run_id}/cancel", response_model=None)
def cancel_run(request: Request, session: SessionDep, run_id: RunId, form: CheckedForm) -> Response:
    try:
        jobs.cancel_run(session, run_id)
    except jobs.NotFound:
        return not_found(request, f"Run {run_id}")
    except jobs.Conflict:
        pass  # it finished meanwhile: its page says so
    return RedirectResponse(f"/runs/{run_id}", 303)


@pages.post("/runs/{run_id}/delete", response_model=None)
def delete_run(
    request: Request, session: SessionDep, settings: SettingsDep, run_id: RunId, form: CheckedForm
) -> Response:
    try:
        jobs.delete_run(session, settings, run_id)
    except jobs.NotFound:
        return not_found(request, f"Run {run_id}")
    except jobs.Conflict as exc:
        return render(request, "error.html", {"title": "Cannot delete this run", "message": str(exc)}, 409)
    return RedirectResponse("/", 303)


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


@pages.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request, session: SessionDep, ids: Annotated[list[str] | None, Query()] = None
) -> HTMLResponse:
    wanted = parse_ids(ids or [])
    runs = session.exec(select(Run).where(col(Run.id).in_(wanted))).all() if wanted else []
    runs = sorted(runs, key=lambda r: (r.learning_rate, r.id or 0))
    context = {"runs": runs, "rows": compare_rows(list(runs)), "sweep": None, "analysis": None}
    return render(request, "compare.html", context)


def sweep_analysis(runs: list[Run]) -> dict[str, Any] | None:
    """The sweep's ranking and recommended rate, once some of its runs have their analysis."""
    if not any(r.summary for r in runs):
        return None
    return summarize_sweep(
        [{"id": r.id, "learning_rate": r.learning_rate, "status": r.status, "summary": r.summary} for r in runs]
    )


@pages.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(request: Request, session: SessionDep, sweep_id: RunId) -> HTMLResponse:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        return not_found(request, f"Sweep {sweep_id}")
    runs = session.exec(select(Run).where(Run.sweep_id == sweep_id).order_by(col(Run.learning_rate))).all()
    analysis = sweep_analysis(list(runs))
    context = {"runs": runs, "rows": compare_rows(list(runs)), "sweep": sweep, "analysis": analysis}
    return render(request, "compare.html", context)


# --- sign-in (only with STEPSCOPE_TOKEN set) ------------------------------------------------------------


def _local_path(target: str) -> str:
    """Only a path on this site may be a redirect target (never //other.site or http://...)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next_: Annotated[str, Query(alias="next")] = "/") -> HTMLResponse:
    return render(request, "login.html", {"next": _local_path(next_), "error": ""})


@router.post("/login", response_model=None)
def login(request: Request, settings: SettingsDep, form: CheckedForm) -> Response:
    target = _local_path(str(form.get("next", "/")))
    sent = form.get("token", "")
    if (
        not settings.token
        or not isinstance(sent, str)
        or not secrets.compare_digest(sent.encode(), settings.token.encode())
    ):
        return render(request, "login.html", {"next": target, "error": "That is not the server's token."}, 401)
    response = RedirectResponse(target, 303)
    response.set_cookie(AUTH_COOKIE, auth_cookie_value(settings.token), httponly=True, samesite="strict", path="/")
    return response


router.include_router(pages)
