"""Answers at eval steps: recorded, deterministic, and scored, so that a good rate shows itself in what the
model answers (exact match near 1) and a too-small one does not (near 0, chance for a free-text answer)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from trainer.config import ConfigError, make_config
from trainer.generate import EXACT_MATCH_KEY, OVERLAP_KEY, greedy_answers, pick_prompts, stream_text, token_overlap
from trainer.models import tiny_model, tiny_tokenizer

LOOKUP = ["--dataset", "synthetic-lookup", "--max-steps", "40", "--eval-every", "20", "--batch-size", "16"]


def answers(home: Path, run_id: int) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "stepscope.db") as conn:
        columns = "step, prompt_index, prompt, expected, output, exact"
        sql = f"SELECT {columns} FROM generations WHERE run_id = ? ORDER BY step, prompt_index"

        return conn.execute(sql, (run_id,)).fetchall()


def scalars(home: Path, run_id: int) -> dict[tuple[str, int], float]:
    with sqlite3.connect(home / "stepscope.db") as conn:
        rows = conn.execute("SELECT key, step, value FROM scalar_metrics WHERE run_id = ?", (run_id,)).fetchall()
    return {(key, step): value for key, step, value in rows}


def test_a_good_rate_answers_the_lookup_and_a_tiny_one_does_not(trained, home: Path) -> None:
    code, good, _ = trained(*LOOKUP, "--learning-rate", "1e-2")
    assert code == 0
    code, small, _ = trained(*LOOKUP, "--learning-rate", "1e-5")
    assert code == 0
    good_scores, small_scores = scalars(home, good["id"]), scalars(home, small["id"])
    assert good_scores[(EXACT_MATCH_KEY, 40)] >= 0.875, good_scores
    assert small_scores[(EXACT_MATCH_KEY, 40)] == 0.0, small_scores  # ten colours to name: it names none
    assert good_scores[(OVERLAP_KEY, 40)] >= good_scores[(EXACT_MATCH_KEY, 40)]

    rows = answers(home, good["id"])
    assert sorted({r[0] for r in rows}) == [20, 40]  # every eval step, the last one included
    last = [r for r in rows if r[0] == 40]
    assert [r[1] for r in last] == list(range(8))  # generate_count's default
    assert len({r[2] for r in last}) == 8  # distinct held-out prompts
    assert all(r[4] == r[3] for r in last if r[5]) and all(r[4] != r[3] for r in last if not r[5])
    assert sum(r[5] for r in last) / len(last) == good_scores[(EXACT_MATCH_KEY, 40)]
    # both runs answered the same questions
    assert [r[2] for r in answers(home, small["id"]) if r[0] == 40] == [r[2] for r in last]


def test_answers_are_deterministic_for_a_seed(trained, home: Path) -> None:
    flags = [*LOOKUP, "--learning-rate", "3e-3", "--max-steps", "20"]
    _, first, _ = trained(*flags)
    _, second, _ = trained(*flags)
    assert answers(home, first["id"]) and answers(home, first["id"]) == answers(home, second["id"])


def test_generate_count_zero_records_no_answers(trained, home: Path) -> None:
    _, run, rows = trained(*LOOKUP, "--max-steps", "20", "--generate-count", "0")
    assert len(rows) == 20
    assert answers(home, run["id"]) == [] and scalars(home, run["id"]) == {}


@pytest.mark.parametrize(("field", "value"), [("generate_count", 65), ("generate_max_new_tokens", -1)])
def test_generation_bounds_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError) as err:
        make_config({field: value})
    assert err.value.field == field


def test_token_overlap_is_word_f1() -> None:
    assert token_overlap("the red fox", "the red fox") == 1.0
    assert token_overlap("a red fox", "the red fox") == pytest.approx(2 / 3)
    assert token_overlap("blue", "red") == 0.0


def test_prompts_of_chat_examples_end_with_the_generation_prompt() -> None:
    tok = tiny_tokenizer()
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    prompts = pick_prompts([*chats, {"text": "plain text has no prompt"}], tok, 4)
    assert len(prompts) == 1  # duplicates and plain text are left out
    assert prompts[0].prompt == "user: hi\nassistant: " and prompts[0].expected == "hello"


def test_a_prompt_longer_than_max_seq_len_keeps_its_end() -> None:
    tok = tiny_tokenizer()
    long = {"prompt": "word " * 300 + "The otter is ", "completion": "ivory"}
    full = list(tok(long["prompt"], add_special_tokens=False)["input_ids"])
    (cut,) = pick_prompts([long], tok, 1, max_len=32)
    assert len(full) > 32 and cut.ids == full[-32:]  # the question, right before the answer
    assert cut.prompt.startswith("…") and cut.prompt.endswith("The otter is ")
    (whole,) = pick_prompts([long], tok, 1, max_len=len(full))
    assert whole.ids == full and whole.prompt == long["prompt"]


def test_streamed_greedy_text_is_the_greedy_answer() -> None:
    """The playground's token-by-token loop and the eval steps' batched `generate` agree at temperature 0."""
    import torch

    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    examples = [{"prompt": "The otter is ", "completion": "ivory"}, {"prompt": "Q: 1+2=", "completion": "3"}]
    prompts = pick_prompts(examples, tok, 2)
    batched = greedy_answers(model, tok, prompts, 12, torch.device("cpu"), None)
    for prompt, answer in zip(prompts, batched, strict=True):
        assert "".join(stream_text(model, tok, prompt.ids, 12, 0.0, 1.0, seed=0)) == answer.output
    sampled = ["".join(stream_text(model, tok, prompts[0].ids, 12, 1.0, 0.9, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
