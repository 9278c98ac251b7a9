"""Batched greedy generation: left padding, KV cache, length-sorted batches, shared prefix read once.

Gives the same text as decoding each prompt alone (checked in tests): greedy, fp32, with the
attention mask and positions derived from the padding. Prompts that open with the same tokens
(few-shot examples, an instruction) have that prefix read once: its KV cache is copied into
every batch, which then reads `prefix, padding, rest of the prompt` with the padding masked out.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from cairn.data.batching import left_padded, pad_id
from cairn.errors import ConfigError
from cairn.progress import bar as progress_bar

# Fewest shared tokens worth a cached prefix: below this, copying the cache costs about what it saves.
MIN_SHARED_PREFIX = 16


def shared_prefix(encoded: list[list[int]]) -> int:
    """Tokens every sequence opens with, leaving each at least its last token to read."""
    if len(encoded) < 2:
        return 0
    n = min(len(e) for e in encoded) - 1
    first = encoded[0]
    for seq in encoded[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n


def usable_prefix(model, encoded: list[list[int]]) -> int:
    """Tokens of `encoded`'s shared prefix worth reading once: none for a model that must see each
    prompt whole in one pass (a LoRA-MoE routing by the whole prompt sets `reads_whole_prompt`),
    none below MIN_SHARED_PREFIX."""
    shared = 0 if getattr(model, "reads_whole_prompt", False) else shared_prefix(encoded)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefix_cache(model, ids: list[int], device):
    """The KV cache of `model` after reading `ids` (one sequence)."""
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return out.cache


def repeated(cache, rows: int):
    """A copy of a one-sequence KV `cache` for a batch of `rows` (the original stays for the next batch)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    return cache


class FirstCharacter(StoppingCriteria):
    """Done for a row once the text it generated holds a non-space character."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([bool(t.strip()) for t in texts], device=input_ids.device)


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    stop_at_newline: bool = False,
    first_character: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of `prompts` (special tokens dropped, cut at the first newline if asked;
    with `first_character`, each stops once it holds a non-space character: all a choice reads).

    A model that must see each prompt whole in one pass (a LoRA-MoE routing by the whole prompt
    sets `reads_whole_prompt`) gets no shared prefix. `max_new_tokens` is bounded by the
    positions the model was built for (1e8 would otherwise run for days)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens {max_new_tokens} is more than the model's {limit} positions (max_position_embeddings); ask for at most {limit}")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    shared = usable_prefix(model, encoded)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad = pad_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=["\n"] if stop_at_newline else None,
    )
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    with torch.inference_mode():
        cache = prefix_cache(model, encoded[0][:shared], device) if shared else None
        for batch in progress_bar(batches, desc="generating", disable=not progress, leave=False):
            ids, mask = left_padded([encoded[i][shared:] for i in batch], pad, encoded[batch[0]][:shared])
            width = ids.shape[1]
            extra = {}
            if cache is not None:
                extra["cache"] = repeated(cache, len(batch))
            if first_character:
                extra["stopping_criteria"] = StoppingCriteriaList([FirstCharacter(tokenizer, width)])
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                tokenizer=tokenizer if stop_at_newline else None,
                **extra,
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                outputs[i] = text.split("\n", 1)[0].strip() if stop_at_newline else text.strip()
    model.train(was_training)
    return outputs
