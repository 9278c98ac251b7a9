"""Training the routers of a `trained` LoRA-MoE on a small labelled mixture of the tasks (fully-collaborative)."""

from __future__ import annotations

import random

import torch
from torch import nn

from cairn.data.batching import IGNORE, collate, encode, pad_id
from cairn.methods.moe.routing import routers
from cairn.options import MoeOptions
from cairn.progress import bar as progress_bar
from cairn.training import answer_loss


def train_router(model, tokenizer, tasks: list, opts: MoeOptions, *, progress: bool = False) -> list[float]:
    """Train the routers of a `trained` LoRA-MoE (experts and base frozen) on `router_examples`
    examples of each task: the answer loss plus `balance` x the Switch load-balancing loss
    (E · Σₖ fₖ·pₖ, fₖ the share of rows whose top choice is k, pₖ the mean router probability of
    k), averaged over layers. Returns the mean answer loss of each epoch."""
    rng = random.Random(opts.seed)
    examples = [ex for t in tasks for ex in rng.sample(list(t.train), min(opts.router_examples, len(t.train)))]
    layers = list(routers(model).values())
    params = [p for r in layers for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=opts.router_lr)
    pad = pad_id(tokenizer)
    context = layers[0].context
    losses = []
    model.train()
    for _ in progress_bar(range(opts.router_epochs), desc="training the router", disable=not progress, leave=False):
        rng.shuffle(examples)
        total = 0.0
        for i in range(0, len(examples), 16):
            batch = collate([encode(ex, tokenizer) for ex in examples[i : i + 16]], pad)
            context.override = (batch["labels"] == IGNORE) & batch["attention_mask"].bool()
            try:
                loss, _ = answer_loss(model, batch)
            finally:
                context.override = None
            balance = 0.0
            for r in layers:
                probs = r.logits.reshape(-1, r.n).softmax(-1)
                share = nn.functional.one_hot(probs.argmax(-1), r.n).float().mean(0)
                balance = balance + r.n * (share * probs.mean(0)).sum()
            (loss + opts.balance * balance / len(layers)).backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch["input_ids"])
        losses.append(total / len(examples))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return losses
