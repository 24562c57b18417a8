"""Datasets: built-ins are deterministic, user files are validated with errors naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.batches import IGNORE, tokenize
from trainer.data import BUILTIN_DATASETS, DataError, inspect_file, load_examples, plan_steps
from trainer.models import tiny_tokenizer


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_builtin_is_deterministic_with_separate_eval() -> None:
    ds = BUILTIN_DATASETS["synthetic-arithmetic"]
    train, evals = ds.generate(seed=3)
    assert len(train) == 1000 and len(evals) == 100
    assert ds.generate(seed=3) == (train, evals)
    assert ds.generate(seed=4)[0] != train
    assert train[:100] != evals  # eval examples are generated separately
    a, b = map(int, train[0]["prompt"].removeprefix("Q: ").split("=")[0].split("+"))
    assert train[0]["completion"] == str(a + b)


def test_plan_steps_textbook_numbers() -> None:
    assert plan_steps(1000, 100, 1, 1, None) == (10, 10)
    assert plan_steps(1000, 100, 2, 1, None) == (5, 5)
    assert plan_steps(1000, 64, 1, 2, None) == (16, 32)
    assert plan_steps(1000, 100, 1, 1.5, None) == (10, 15)
    assert plan_steps(1000, 100, 1, 1, 37) == (10, 37)


def test_prompt_completion_loss_only_on_completion() -> None:
    tok = tiny_tokenizer()
    ids, labels = tokenize({"prompt": "Q: 1+1=\nA: ", "completion": "2"}, tok, 64)
    n_prompt = len("Q: 1+1=\nA: ")
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == [tok.convert_tokens_to_ids("2"), tok.eos_token_id]


def test_chat_messages_loss_on_last_assistant_reply() -> None:
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, labels = tokenize({"messages": msgs}, tok, 64)
    supervised = [i for i, y in zip(ids, labels, strict=True) if y != IGNORE]
    assert tok.decode(supervised) == "yo\n"


def test_truncates_to_max_seq_len() -> None:
    ids, labels = tokenize({"text": "x" * 100}, tiny_tokenizer(), 16)
    assert len(ids) == len(labels) == 16


def test_user_jsonl_split_and_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    assert inspect_file(path) == ("prompt_completion", 50)
    train, evals = load_examples(str(path), tmp_path, seed=0)
    assert len(train) == 45 and len(evals) == 5
    assert {e["prompt"] for e in train}.isdisjoint(e["prompt"] for e in evals)


def test_csv_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text\nhello world\nsecond row\n")
    assert inspect_file(path) == ("text", 2)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ".jsonl", "bad.jsonl, line 2, field 'completion'"),
        ('{"prompt": "a", "completion": "b"}\n{oops\n', ".jsonl", "bad.jsonl, line 2: invalid JSON"),
        ('{"messages": [{"role": "user"}]}\n', ".jsonl", "bad.jsonl, line 1, field 'messages'"),
        ('{"foo": 1}\n', ".jsonl", "bad.jsonl, line 1: needs 'prompt' and 'completion'"),
        ('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', ".jsonl", "bad.jsonl, line 2: is prompt_completion"),
        ("prompt,completion\nhi,\n", ".csv", "bad.csv, line 2, field 'completion'"),
        ("", ".jsonl", "bad.jsonl: has no records"),
        ("{}", ".txt", "bad.txt: must be a .jsonl or .csv file"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        inspect_file(path)
    assert message in str(exc.value)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'missing'"):
        load_examples("missing", tmp_path, seed=0)
