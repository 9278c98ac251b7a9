"""The `l2` strategy: sequential training pulled back to the base model's weights (L2-SP, methods/l2.py)."""

from __future__ import annotations

from typing import Iterator

from cairn.manifest import read_manifest
from cairn.methods.l2 import penalty
from cairn.methods.olora import penalty_ratio
from cairn.models import fingerprint
from cairn.options import L2Options, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: L2Options, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Each stage continues the previous one's model (LoRA: the same adapter, which is the whole
    delta from the base) with loss + λ · Σ‖θ − θ_base‖²; semi-collaborative: it reads the current
    task and the base only. Each stage records its penalty-to-task-loss ratio."""
    key = ("l2", fingerprint(model), opts.model_dump())
    loss = penalty(model, opts.lambda_, cfg.method) if opts.lambda_ else None  # FFT: the base's weights copied before the first stage moves them
    for task in stream:
        model = work.train(model, task, cfg, extra_loss=loss, key=key)
        note_penalty(work)
        yield model


def note_penalty(work: Workspace) -> None:
    """Record, in the stage row, the regulariser's share of the loss at the first and last step of
    the stage just trained (or reused: its manifest keeps what it was trained with)."""
    trained = read_manifest(work.used[-1])["train"]
    if trained.get("extra_losses"):
        work.note(penalty_ratio=penalty_ratio(trained["extra_losses"], trained["losses"]))
