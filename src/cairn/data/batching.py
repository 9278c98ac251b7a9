"""Tokenise examples for answer-only training and batch them by length with dynamic padding."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from cairn.data.task import Example

IGNORE = -100


def continuation(example: Example) -> str:
    """The answer as the text that follows the prompt: with a leading space unless one side has it."""
    joiner = "" if example.prompt[-1:].isspace() or example.answer[:1].isspace() else " "
    return joiner + example.answer


def encode(example: Example, tokenizer, max_length: int = 1024) -> dict[str, list[int]]:
    """Token ids of prompt + answer + EOS; labels are IGNORE on the prompt so the loss is on the answer.

    The answer is its `continuation`, matching how generation continues a prompt. Over-long
    examples lose prompt tokens from the left, never answer tokens.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(continuation(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length) :]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE] * len(prompt_ids) + answer_ids,
    }


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest sequence (never to a global maximum)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id(tokenizer) -> int:
    """The token Cairn pads with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(sequences: list[list[int]], pad: int, prefix: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `sequences` left-padded to the longest, as generation reads them;
    a shared `prefix` stays in front of every row, the padding between it and each row's rest."""
    start = len(prefix)
    width = start + max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    if start:
        ids[:, :start] = torch.tensor(list(prefix))
        mask[:, :start] = 1
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def length_grouped_loader(features: list[dict], batch_size: int, pad_id: int, seed: int) -> DataLoader:
    """Batches of similar length in a seeded random order (transformers' LengthGroupedSampler)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = LengthGroupedSampler(batch_size, lengths=[len(f["input_ids"]) for f in features], generator=generator)
    return DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=lambda b: collate(b, pad_id))
