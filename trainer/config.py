"""The one validated training configuration.

Field names are used unchanged by the CLI (`--learning-rate` or `--learning_rate`), by the REST API
(the JSON body of `POST /api/runs`) and by the database (the run's `config` column).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATASET = "synthetic-arithmetic"
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANGE_TEST_STEPS = 100


class ConfigError(ValueError):
    """An invalid config value; `field` names the offending field, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("", max_length=200, description="Run name shown in the dashboard (empty: generated).")
    kind: Literal["train", "lr_range_test"] = Field(
        "train", description="'train', or 'lr_range_test' (lr grows exponentially from range_min_lr to range_max_lr)."
    )
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Built-in model name, a local Hugging Face model folder, or a hub id already in the local cache.",
    )
    dataset: str = Field(
        DEFAULT_DATASET, min_length=1, description="Built-in dataset name, an uploaded dataset, or a JSONL/CSV path."
    )
    learning_rate: float = Field(2e-4, description="Step size of each parameter update (peak lr for schedules).")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated into one optimizer step.")
    epochs: float = Field(
        1.0, gt=0, le=10_000, description="Passes over the training set (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Total optimizer steps; overrides epochs (data cycles as needed)."
    )
    max_seq_len: int = Field(128, ge=8, le=32_768, description="Longest token sequence; longer examples are truncated.")
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=100_000, description="LoRA scale numerator: alpha / r (or / sqrt(r)).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_TARGET_MODULES),
        min_length=1,
        description="Module names that get LoRA adapters (Llama-style attention projections by default).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: adamw or sgd.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (0 is plain SGD).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "constant", description="Learning-rate schedule over the optimizer steps."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from 0 to learning_rate.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 disables clipping).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data generation, shuffling and LoRA init.")
    eval_every: int = Field(20, ge=0, description="Record eval loss every this many steps (0: only at the end).")
    checkpoint_every: int = Field(
        200,
        ge=0,
        le=10_000_000,
        description="Save a checkpoint every this many steps and at least every 10 minutes, to resume an "
        "interrupted run from (0: never).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision (auto: bf16 on a GPU that supports it, else fp32)."
    )
    range_min_lr: float = Field(1e-7, description="LR range test: first learning rate.")
    range_max_lr: float = Field(1.0, description="LR range test: last learning rate.")
    loraplus_lr_ratio: float | None = Field(
        None,
        description="LoRA+: the B matrices learn at this many times learning_rate (Hayou et al. 2024 suggest 16; "
        "empty: off).",
    )
    # The walk down the mountain (trainer.landscape): what each step did, beyond its loss.
    probe_every: int = Field(
        200,  # a probe costs about 4 training steps of LoRA (bench/landscape.py): +2% of a run
        ge=0,
        le=10_000_000,
        description="At step 1 and every this many steps, evaluate the loss along the step just taken (a fixed "
        "probe batch at -1..3 times the step) to see where its lowest point lay (0: never).",
    )
    module_norms_every: int = Field(
        10,
        ge=0,
        le=10_000_000,
        description="At step 1 and every this many steps, record each LoRA tensor's update and weight norm, for "
        "the heat map of which modules moved (0: never).",
    )
    map_snapshots: int = Field(
        20,
        ge=0,
        le=256,
        description="LoRA weight snapshots kept for the loss map, spread evenly over the run (0: none).",
    )
    # Answers at eval steps (trainer.generate): one greedy batch of generate_count prompts, generate_max_new_tokens
    # forward passes, at each eval step only. 8 x 16 costs about what the eval loss over 100 examples does.
    generate_count: int = Field(
        8, ge=0, le=64, description="Held-out prompts answered (greedily) at each eval step, for accuracy (0: none)."
    )
    generate_max_new_tokens: int = Field(
        16, ge=0, le=256, description="Longest answer at eval steps, in tokens (0: no answers)."
    )

    @field_validator("learning_rate", "range_min_lr", "range_max_lr")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a finite number > 0")
        return value

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError("must be a finite number > 0 (or empty for plain LoRA)")
        return value

    @field_validator("weight_decay", "max_grad_norm", "epochs", "momentum", "lora_dropout")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        if any(not m.strip() for m in value):
            raise ValueError("module names must not be empty")
        return [m.strip() for m in value]

    @property
    def step_limit(self) -> int | None:
        """Optimizer steps when fixed by max_steps (an lr range test without it takes 100), else None."""
        if self.max_steps is None and self.kind == "lr_range_test":
            return RANGE_TEST_STEPS
        return self.max_steps

    def run_columns(self) -> dict[str, Any]:
        """The `runs` table's columns that repeat this config (for filters and lists), with its JSON; an
        unnamed run is named by its optimizer, rate and batch size, the same from the CLI and the API."""
        name = self.name or f"{self.optimizer} lr={self.learning_rate:g} bs={self.batch_size}"
        return {
            "name": name,
            "kind": self.kind,
            "model": self.model,
            "dataset": self.dataset,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "config": self.model_dump(mode="json"),
        }

    # Cross-field checks sit on the later field, so the error names the field a user should change.
    @field_validator("momentum")
    @classmethod
    def _momentum_needs_sgd(cls, value: float, info: ValidationInfo) -> float:
        if value and info.data.get("optimizer") != "sgd":
            raise ValueError("applies to the sgd optimizer only (set optimizer to sgd or momentum to 0)")
        return value

    @field_validator("range_max_lr")
    @classmethod
    def _range_ordered(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("range_min_lr")
        if low is not None and value <= low:
            raise ValueError("must be above range_min_lr")
        return value


def first_error(exc: ValidationError) -> ConfigError:
    """Turn pydantic's error list into one error naming the first bad field and the reason."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    reason = err["msg"].removeprefix("Value error, ")
    return ConfigError(field, reason)


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Validate `values`, raising ConfigError (field and reason) on the first problem."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise first_error(exc) from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (not yet validated)."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of field names to values")
    return data


def field_help() -> dict[str, tuple[Any, str]]:
    """Each field's default and one-line description, for the CLI and the form."""
    out: dict[str, tuple[Any, str]] = {}
    for name, info in TrainConfig.model_fields.items():
        default = info.get_default(call_default_factory=True)
        out[name] = (default, info.description or "")
    return out
