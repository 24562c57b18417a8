"""What a run's model now answers: greedy completions of a few fixed held-out prompts at every eval step,
scored against the expected completion, and token-by-token sampling for the server's playground.

A loss curve says how far a run got, not what the model does; these answers show it. The prompts are
the first distinct prompts of the held-out set (the same for every run of a dataset and seed), so runs
at different learning rates answer the same questions. Generating reads its tokens back to the host
(greedy decoding decides each next token there), so it happens only at eval steps, never per step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data import Example

EXACT_MATCH_KEY = "eval/exact_match"
"""The share of held-out prompts whose answer is exactly the expected completion (after trimming spaces)."""
OVERLAP_KEY = "eval/token_overlap"
"""The mean word-overlap F1 of the answers against the expected completions (SQuAD's token F1)."""


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt the run answers at every eval step; `expected` is None where nothing can be checked."""

    prompt: str
    expected: str | None
    ids: list[int]


@dataclass(frozen=True)
class Answer:
    index: int
    output: str
    exact: bool | None
    overlap: float | None


def pick_prompts(examples: list[Example], tok: Any, count: int, max_len: int | None = None) -> list[Prompt]:
    """The first `count` distinct prompts of the held-out examples: prompt/completion pairs and chat turns
    ending in an assistant reply (its reply is expected). Plain `text` examples have no prompt: none.

    A prompt longer than `max_len` tokens (the run's max_seq_len, as training cuts its examples) keeps its
    last `max_len`, where the question is, and is shown from "…" on: eight long prompts at every eval step
    would otherwise cost more than the steps between them."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for example in examples:
        if len(prompts) >= count:
            break
        if "prompt" in example:
            prompt, expected = example["prompt"], example["completion"]
            ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
        elif "messages" in example and example["messages"][-1]["role"] == "assistant":
            turns = example["messages"][:-1]
            ids = list(tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=False))
            prompt, expected = tok.decode(ids), example["messages"][-1]["content"]
        else:
            continue
        if prompt in seen or not ids:
            continue
        seen.add(prompt)
        if max_len is not None and len(ids) > max_len:
            ids = ids[-max_len:]
            prompt = "…" + tok.decode(ids)
        prompts.append(Prompt(prompt, expected, ids))
    return prompts


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def token_overlap(output: str, expected: str) -> float:
    """Word-level F1 between an answer and the expected completion: 1 for the same words, 0 for none shared."""
    got, want = _words(output), _words(expected)
    if not got or not want:
        return float(got == want)
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score(index: int, output: str, expected: str | None) -> Answer:
    if expected is None:
        return Answer(index, output, None, None)
    return Answer(index, output, output.strip() == expected.strip(), token_overlap(output, expected))


@torch.no_grad()
def greedy_answers(
    model: Any, tok: Any, prompts: list[Prompt], max_new_tokens: int, device: torch.device, dtype: torch.dtype | None
) -> list[Answer]:
    """Each prompt's greedy completion (up to the end-of-sequence token or `max_new_tokens`), scored.

    All prompts go in one left-padded batch, so the cost is `max_new_tokens` forward passes of one batch.
    """
    if not prompts or max_new_tokens <= 0:
        return []
    was_training = model.training
    model.eval()
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
        mask[row, width - len(prompt.ids) :] = 1
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    if was_training:
        model.train()
    answers = []
    for row, (prompt, tokens) in enumerate(zip(prompts, out[:, width:].tolist(), strict=True)):
        if tok.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tok.eos_token_id)]
        answers.append(score(row, tok.decode(tokens, skip_special_tokens=True), prompt.expected))
    return answers


def accuracy(answers: list[Answer]) -> dict[str, float]:
    """The eval metrics of a step's answers: exact-match share and mean overlap, over the checkable ones."""
    checked = [a for a in answers if a.exact is not None]
    if not checked:
        return {}
    return {
        EXACT_MATCH_KEY: sum(bool(a.exact) for a in checked) / len(checked),
        OVERLAP_KEY: sum(a.overlap or 0.0 for a in checked) / len(checked),
    }


# --- the playground: one prompt, token by token ------------------------------------------------------


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The next token: the most likely at temperature 0, else sampled from the smallest set of tokens whose
    probabilities reach `top_p` (nucleus sampling, Holtzman et al. 2019)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # a token stays if the ones above it fall short of top_p
    ordered = ordered * keep
    choice = torch.multinomial(ordered / ordered.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def stream_text(
    model: Any, tok: Any, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> Iterator[str]:
    """The completion of `ids`, yielded as pieces of text as tokens are chosen (ends at end-of-sequence)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    cache = None
    tokens: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        token = _pick(out.logits[0, -1].cpu(), temperature, top_p, generator)
        if token == tok.eos_token_id:
            break
        tokens.append(token)
        text = tok.decode(tokens, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text
        x = torch.tensor([[token]], device=device)
