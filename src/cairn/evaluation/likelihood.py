"""Old knowledge measured by likelihood rather than generation: how probable the correct answer is.

Exact match on a generation cannot tell "forgot the fact" from "answers in another format"; the
answer's likelihood can. Per example: the mean log-probability of the answer's tokens given the
prompt (the tokens training puts its loss on, EOS included), and whether the correct answer is
more probable than `alternatives` others drawn (seeded) from the split's other answers, as a
multiple-choice reading of the same question. Reported beside G and relative to the base.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

from cairn.data.batching import IGNORE, collate, encode, pad_id
from cairn.data.task import Example, Task


@dataclass
class LikelihoodResult:
    task: str
    split: str
    n: int
    mean_logprob: float  # mean over examples of the answer's mean token log-probability
    ranked_first: float  # fraction of examples whose correct answer outranks every alternative
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def answer_logprobs(model, tokenizer, examples: list[Example], *, batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Each example's mean log-probability per answer token given its prompt (right-padded batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = [encode(ex, tokenizer, max_length) for ex in examples]
    out = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += (picked.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    model.train(was_training)
    return out


def likelihood_scores(model, tokenizer, task: Task, *, split: str = "test", alternatives: int = 3, batch_size: int = 16, seed: int = 0) -> LikelihoodResult:
    """`task`'s split read by likelihood: see the module's docstring."""
    examples = task.split(split)
    answers = sorted({ex.answer for ex in examples})
    rng = random.Random(f"{seed}:{task.name}:{split}")
    candidates = []
    for ex in examples:
        others = [a for a in answers if a != ex.answer]
        candidates.append([ex.answer, *rng.sample(others, min(alternatives, len(others)))])
    flat = [Example(ex.prompt, a) for ex, cands in zip(examples, candidates) for a in cands]
    scores = iter(answer_logprobs(model, tokenizer, flat, batch_size=batch_size))
    rows = []
    for ex, cands in zip(examples, candidates):
        lp = [next(scores) for _ in cands]
        rows.append({"prompt": ex.prompt, "answer": ex.answer, "logprob": lp[0], "alternatives": dict(zip(cands[1:], lp[1:])),
                     "ranked_first": float(all(lp[0] > x for x in lp[1:]))})
    n = len(rows)
    return LikelihoodResult(task.name, split, n, sum(r["logprob"] for r in rows) / n if n else 0.0, sum(r["ranked_first"] for r in rows) / n if n else 0.0, rows)
