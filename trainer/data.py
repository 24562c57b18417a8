"""Datasets: built-in synthetic ones generated from the seed, or the user's JSONL/CSV files; the step plan.

An example is a dict in one of three shapes: `prompt`/`completion` (loss on the completion only),
`text` (loss on every token) or chat `messages` (loss on the last assistant reply). Nothing here
imports torch, so the server checks datasets and plans runs without it (`trainer.batches` tokenises).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Example = dict[str, Any]
EVAL_FRACTION = 0.1  # of a user file, held out for eval loss
MAX_EVAL = 200


class DataError(ValueError):
    """A problem in a dataset, naming the file, line and field where there is one."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None, field: str | None = None):
        where = ", ".join(p for p in (file, f"line {line}" if line else "", f"field {field!r}" if field else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.line, self.field = file, line, field


# --- built-in synthetic datasets -----------------------------------------------------------------


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"Q: {a}+{b}=\nA: ", "completion": str(a + b)}


_COLOURS = ["red", "green", "blue", "amber", "violet", "teal", "coral", "olive", "navy", "ivory"]
_ANIMALS = ["otter", "heron", "lynx", "moth", "bison", "gecko", "wren", "yak", "eel", "ibis"]


def _lookup(rng: random.Random) -> Example:
    # A fixed table (the same for every seed): the colour of each animal. The model memorises 10 facts,
    # so loss falls fast at a good learning rate and the effect of the step size is easy to see.
    animal = rng.choice(_ANIMALS)
    colour = _COLOURS[(_ANIMALS.index(animal) * 7 + 3) % len(_COLOURS)]
    return {"prompt": f"The {animal} is ", "completion": colour}


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    n_train: int
    n_eval: int
    make: Callable[[random.Random], Example]

    def generate(self, seed: int) -> tuple[list[Example], list[Example]]:
        """Train and eval examples, each from its own seeded generator (eval is never a slice of train)."""
        train_rng = random.Random(f"{self.name}/train/{seed}")
        eval_rng = random.Random(f"{self.name}/eval/{seed}")
        return [self.make(train_rng) for _ in range(self.n_train)], [self.make(eval_rng) for _ in range(self.n_eval)]


BUILTIN_DATASETS = {
    d.name: d
    for d in (
        BuiltinDataset(
            "synthetic-arithmetic",
            "Two-digit additions (prompt 'Q: 12+34=', completion '46'); 1000 train / 100 eval examples",
            1000,
            100,
            _arithmetic,
        ),
        BuiltinDataset(
            "synthetic-lookup",
            "Ten memorisable facts ('The otter is ' → 'ivory'); 1000 train / 100 eval examples",
            1000,
            100,
            _lookup,
        ),
    )
}


# --- user files ------------------------------------------------------------------------------------


def _check_example(row: Any, file: str, line: int) -> tuple[str, Example]:
    if not isinstance(row, dict):
        raise DataError("each record must be an object", file=file, line=line)
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("must be a non-empty list of {role, content}", file=file, line=line, field="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"item {i} needs string 'role' and 'content'", file=file, line=line, field="messages")
        return "messages", {"messages": msgs}
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError("must be a string", file=file, line=line, field=key)
        if not row["completion"]:
            raise DataError("must not be empty", file=file, line=line, field="completion")
        return "prompt_completion", {"prompt": row["prompt"], "completion": row["completion"]}
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise DataError("must be a non-empty string", file=file, line=line, field="text")
        return "text", {"text": row["text"]}
    raise DataError("needs 'prompt' and 'completion', 'text', or 'messages'", file=file, line=line)


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    name = path.name
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError("empty CSV file (a header row is needed)", file=name, line=1)
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}
        return
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError("must be a .jsonl or .csv file", file=name)
    with path.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg})", file=name, line=line_no) from None


def read_file(path: Path) -> tuple[str, list[Example]]:
    """Validate every record of a JSONL/CSV file; return (format, examples). Errors name file, line, field."""
    fmt: str | None = None
    examples: list[Example] = []
    try:
        for line_no, row in _records(path):
            row_fmt, example = _check_example(row, path.name, line_no)
            if fmt is None:
                fmt = row_fmt
            elif row_fmt != fmt:
                raise DataError(f"is {row_fmt} but earlier records are {fmt}", file=path.name, line=line_no)
            examples.append(example)
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text", file=path.name) from None
    if not examples or fmt is None:
        raise DataError("has no records", file=path.name)
    return fmt, examples


def inspect_file(path: Path) -> tuple[str, int]:
    """(format, number of records) of a valid dataset file; raises DataError otherwise."""
    fmt, examples = read_file(path)
    return fmt, len(examples)


def resolve_dataset(spec: str, datasets_dir: Path) -> Path | None:
    """None for a built-in, else the file: an uploaded dataset's generated name, or a path (CLI only)."""
    if spec in BUILTIN_DATASETS:
        return None
    uploaded = datasets_dir / spec
    if "/" not in spec and uploaded.is_file():
        return uploaded
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise DataError(f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN_DATASETS)}, or a JSONL/CSV file")


def split_sizes(n_rows: int) -> tuple[int, int]:
    """(n_train, n_eval) of a user file of `n_rows` records."""
    n_eval = min(MAX_EVAL, int(n_rows * EVAL_FRACTION)) if n_rows >= 10 else 0
    return n_rows - n_eval, n_eval


def load_examples(spec: str, datasets_dir: Path, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples. A user file is split by a seeded shuffle: 10% (at most 200) held out."""
    path = resolve_dataset(spec, datasets_dir)
    if path is None:
        return BUILTIN_DATASETS[spec].generate(seed)
    _, examples = read_file(path)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = split_sizes(len(examples))[1]
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def plan_steps(
    n_train: int, batch_size: int, grad_accum_steps: int, epochs: float, max_steps: int | None
) -> tuple[int, int]:
    """(updates_per_epoch, total optimizer steps): 1000 samples at batch size 100 give 10 updates per epoch."""
    per_epoch = math.ceil(n_train / (batch_size * grad_accum_steps))
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * per_epoch))
    return per_epoch, total
