"""The config object: defaults, descriptions and one clear error per bad value."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, TrainConfig, field_help, make_config

FIELDS = [
    "name",
    "model",
    "dataset",
    "learning_rate",
    "batch_size",
    "grad_accum_steps",
    "epochs",
    "max_steps",
    "max_seq_len",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "optimizer",
    "momentum",
    "weight_decay",
    "scheduler",
    "warmup_steps",
    "max_grad_norm",
    "seed",
    "eval_every",
    "device",
    "precision",
]


def test_every_field_has_default_and_description() -> None:
    helps = field_help()
    for name in FIELDS:
        assert name in helps, name
        assert helps[name][1], f"{name} has no description"
    assert TrainConfig().model == "smollm2-135m-instruct"
    assert TrainConfig().max_steps is None


@pytest.mark.parametrize(
    ("values", "field", "reason"),
    [
        ({"learning_rate": 0}, "learning_rate", "finite number > 0"),
        ({"learning_rate": float("nan")}, "learning_rate", "finite number > 0"),
        ({"learning_rate": float("inf")}, "learning_rate", "finite number > 0"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"grad_accum_steps": 0}, "grad_accum_steps", "greater than or equal to 1"),
        ({"epochs": 0}, "epochs", "greater than 0"),
        ({"lora_dropout": 1.5}, "lora_dropout", "less than 1"),
        ({"scheduler": "step"}, "scheduler", "'constant', 'linear', 'cosine' or 'constant_with_warmup'"),
        ({"target_modules": []}, "target_modules", "at least 1 item"),
        ({"momentum": 0.9}, "momentum", "applies to the sgd optimizer only"),
        ({"range_min_lr": 1e-2, "range_max_lr": 1e-3}, "range_max_lr", "must be above range_min_lr"),
        ({"unknown_knob": 1}, "unknown_knob", "Extra inputs are not permitted"),
        ({"max_grad_norm": -1}, "max_grad_norm", "greater than or equal to 0"),
    ],
)
def test_bad_values_name_field_and_reason(values: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_config(values)
    assert exc.value.field == field
    assert reason in exc.value.reason
