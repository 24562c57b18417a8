"""The new-run form: its fields (from TrainConfig), the sweep options, validation with errors next to
each field, and the dataset upload it offers."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session, col, select
from starlette.datastructures import FormData, UploadFile

from app import services
from app.deps import MAX_ID, RunnerDep, SessionDep, SettingsDep
from app.pages.render import CheckedForm, not_found, render, require_sign_in
from app.routers.datasets import save_dataset
from app.routers.lr_range import range_test_name
from app.runner.executor import ClusterUnreachable
from store.tables import Dataset, Run
from trainer.catalog import BUILTIN_MODELS
from trainer.config import RANGE_TEST_STEPS, ConfigError, TrainConfig, field_help
from trainer.data import BUILTIN_DATASETS, plan_steps, split_sizes

router = APIRouter(dependencies=[Depends(require_sign_in)])

# --- the new-run form's fields ------------------------------------------------------------------------

RANGE_GROUP = "LR range test (kind = lr_range_test)"
FIELD_GROUPS: list[tuple[str, list[str]]] = [
    ("Run", ["name", "model", "dataset", "kind"]),
    ("Optimizer", ["learning_rate", "optimizer", "momentum", "weight_decay", "scheduler", "warmup_steps"]),
    ("Length", ["batch_size", "grad_accum_steps", "epochs", "max_steps", "max_seq_len", "eval_every"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "loraplus_lr_ratio"]),
    ("Stability", ["max_grad_norm", "seed", "device", "precision"]),
    (RANGE_GROUP, ["range_min_lr", "range_max_lr"]),
    (
        "The walk (probes along steps, module heat map, loss map)",
        ["probe_every", "module_norms_every", "map_snapshots"],
    ),
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
    "loraplus_lr_ratio": "LoRA+ ratio (B's rate / A's)",
    "probe_every": "Probe along a step every",
    "module_norms_every": "Module norms every",
    "map_snapshots": "Weight snapshots for the map",
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


def model_choices(current: str) -> list[tuple[str, str]]:
    choices = [(name, f"{name}") for name in BUILTIN_MODELS]
    if current and current not in BUILTIN_MODELS:
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
    return split_sizes(n_rows)[0]


def dataset_choices(session: Session, current: str) -> tuple[list[DatasetChoice], list[DatasetChoice]]:
    """(built-in, uploaded) datasets for the select; an unknown current value is kept as an uploaded entry."""
    builtin = [DatasetChoice(n, n, d.n_train, d.description) for n, d in BUILTIN_DATASETS.items()]
    uploaded = [
        DatasetChoice(d.filename, f"{d.name} ({d.n_rows} rows)", uploaded_n_train(d.n_rows), d.name)
        for d in session.exec(select(Dataset).order_by(col(Dataset.created_at).desc())).all()
    ]
    if current and all(current != c.value for c in builtin + uploaded):
        uploaded.append(DatasetChoice(current, current, None, "a file path"))
    return builtin, uploaded


def plan_text(n_train: int | None, values: dict[str, str]) -> str:
    """'1000 samples at batch size 100 → 10 updates per epoch, 10 total steps' (static/run_form.js updates it)."""
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
        if not 2 <= count <= services.MAX_SWEEP_RUNS:
            return [], {"sweep_count": f"must be a whole number from 2 to {services.MAX_SWEEP_RUNS}"}
        return services.log_spaced(low, high, count), {}
    parts = [p for p in re.split(r"[,\s]+", values["sweep_lrs"]) if p]
    try:
        rates = sorted({_positive(p) for p in parts})
    except ValueError:
        return [], {"sweep_lrs": "write learning rates as numbers > 0, separated by commas (e.g. 1e-4, 3e-4, 1e-3)"}
    if not 2 <= len(rates) <= services.MAX_SWEEP_RUNS:
        return [], {"sweep_lrs": f"give from 2 to {services.MAX_SWEEP_RUNS} different learning rates"}
    return rates, {}


def service_error_field(exc: ConfigError, sweep: dict[str, str]) -> str:
    """The form field for a ConfigError from app.services (`learning_rates.2` is one of the sweep's rates)."""
    name = exc.field.removeprefix("config.")
    if name.endswith(".count"):
        return "sweep_count"
    if name.startswith("learning_rates"):
        return "sweep_min" if sweep["sweep_mode"] == "range" else "sweep_lrs"
    return name


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
        "models": BUILTIN_MODELS,
        "plan": plan_text(n_train, values),
        "sweep": sweep,
        "note": note,
    }
    return render(request, "run_form.html", context)


@router.get("/runs/new", response_class=HTMLResponse)
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


@router.post("/runs/new", response_class=HTMLResponse, response_model=None)
def new_run_submit(request: Request, session: SessionDep, runner: RunnerDep, form: CheckedForm) -> Response:
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
        runner.check_ready()
    except ClusterUnreachable as exc:  # nothing is queued: the form stays filled in, with the reason
        return form_page(request, session, values, {"": f"Nothing was queued: {exc}"}, sweep)
    try:
        if rates:
            created_sweep = services.create_sweep(session, config, rates)
            return RedirectResponse(f"/sweeps/{created_sweep.id}", status_code=303)
        run = services.create_run(session, config)
    except ConfigError as exc:
        errors = {service_error_field(exc, sweep): exc.reason}
        return form_page(request, session, values, errors, sweep)
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


@router.post("/datasets/upload", response_model=None)
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
