"""Tokenisation and batches: examples to padded tensors, and the micro-batches of each optimizer step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data import Example

IGNORE = -100  # label value that cross-entropy skips


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def tokenize(example: Example, tok: Any, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with IGNORE on the tokens that carry no loss."""
    if "messages" in example:
        msgs = example["messages"]
        full = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        n_prompt = 0
        if msgs[-1]["role"] == "assistant":
            n_prompt = len(
                tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
            )
        ids, labels = full, [IGNORE] * n_prompt + full[n_prompt:]
    elif "prompt" in example:
        prompt = _encode(tok, example["prompt"])
        answer = _encode(tok, example["completion"]) + [tok.eos_token_id]
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
    else:
        ids = _encode(tok, example["text"]) + [tok.eos_token_id]
        labels = list(ids)
    return ids[:max_seq_len], labels[:max_seq_len]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_samples: int
    n_tokens: int  # real (unpadded) tokens, counted on the host so recording needs no device sync
    n_loss_tokens: int  # tokens whose next token carries a loss (labels after the causal shift)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.n_samples,
            self.n_tokens,
            self.n_loss_tokens,
        )


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (x, y) in enumerate(encoded):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    # The model predicts token i + 1 from tokens up to i, so a row's first label never carries a loss.
    n_loss = sum(1 for _, y in encoded for label in y[1:] if label != IGNORE)
    return Batch(ids, mask, labels, len(encoded), sum(len(x) for x, _ in encoded), n_loss)


def step_batches(
    encoded: list[tuple[list[int], list[int]]], batch_size: int, grad_accum_steps: int, pad_id: int, seed: int
) -> Iterator[list[Batch]]:
    """Yield, forever, the micro-batches of each optimizer step, reshuffling every epoch.

    The last step of an epoch may hold fewer micro-batches (and the last micro-batch fewer samples),
    so each epoch is exactly `updates_per_epoch` optimizer steps.
    """
    epoch = 0
    while True:
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for start in range(0, len(micro), grad_accum_steps):
            yield [collate([encoded[i] for i in idx], pad_id) for idx in micro[start : start + grad_accum_steps]]
        epoch += 1


def eval_batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[Batch]:
    return [collate(encoded[i : i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]
