"""LwF: learning without forgetting by distillation to the previous stage's model on the current
task's data (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017; TRACE's
`model/Regular/LwF.py` for LLMs).

Loss = task loss + λ · mean over the real (unpadded) token positions of the current batch of
KL(p_prev^T ‖ p_cur^T), p^T = softmax(logits / T) the next-token distributions of the previous
stage's model (the teacher, frozen) and of the model being trained, at temperature T (default 2,
LwF's and TRACE's). LwF writes the term as the cross-entropy −Σ p_prev^T log p_cur^T, which is this
KL plus the teacher's entropy, a constant: the same gradient. TRACE's code divides by the batch
size over all positions, padding included, and puts the KL the other way round
(`F.kl_div(log p_prev, p_cur)` is KL(p_cur ‖ p_prev)); this follows the paper (the teacher's
distribution is the target) and leaves padding out. No T² factor (LwF has none; Hinton et al. add
one).

Semi-collaborative: the term reads the current batch and the previous model, nothing earlier. The
batch is read where the training loop already computes the trained model's hidden states: a forward
hook on its decoder (`Distillation`), so the term costs one teacher forward and the output layer on
the real positions, and the training loop is unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from cairn.models import causal_lm_of


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Mean over rows (positions) of KL(softmax(teacher / T) ‖ softmax(student / T)), in float32."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


class Distillation:
    """The `extra_loss` of an LwF stage, as a context over the training: λ · `distillation_kl` between
    `teacher` (frozen; None: the trained model itself with its adapters disabled, i.e. the merged
    previous stage under a fresh LoRA adapter) and the trained model, on each batch the loop trains
    on. Inside the context a forward hook on `model`'s decoder keeps the batch and the hidden states
    the loop computed; the term reads them when the loop calls it, right after that forward pass."""

    def __init__(self, model, teacher, lam: float, temperature: float):
        self.decoder = causal_lm_of(model).get_decoder()
        self.teacher, self.lam, self.temperature = teacher, lam, temperature
        self.seen: dict = {}
        self.teaching = False
        self.handle = None

    def _record(self, _module, _args, kwargs, output) -> None:
        if not self.teaching:
            self.seen = {"input_ids": kwargs["input_ids"], "attention_mask": kwargs["attention_mask"], "hidden": output.last_hidden_state}

    def __enter__(self):
        self.handle = self.decoder.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.seen = {}

    def _teacher_logits(self, model, ids: Tensor, mask: Tensor, real: Tensor) -> Tensor:
        teacher = self.teacher if self.teacher is not None else model
        self.teaching = True
        try:
            with torch.no_grad(), (model.disable_adapter() if self.teacher is None else nullcontext()):
                inner = causal_lm_of(teacher)
                hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                return inner.get_output_embeddings()(hidden[real])
        finally:
            self.teaching = False

    def __call__(self, model) -> Tensor:
        if not self.seen:
            raise RuntimeError("LwF's term was called before a forward pass of the trained model inside its Distillation context")
        ids, mask, hidden = self.seen["input_ids"], self.seen["attention_mask"], self.seen["hidden"]
        real = mask.bool()
        student = causal_lm_of(model).get_output_embeddings()(hidden[real])
        teacher = self._teacher_logits(model, ids, mask, real)
        self.seen = {}
        return self.lam * distillation_kl(student, teacher, self.temperature)

