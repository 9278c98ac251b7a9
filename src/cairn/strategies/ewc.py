"""The `ewc` strategy: sequential training with an elastic penalty from each earlier contribution's
shipped Fisher information (methods/ewc.py); semi-collaborative."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from cairn.distributed import main_writes
from cairn.methods.ewc import FILE, diagonal_fisher, penalty, save_fisher
from cairn.options import EWCOptions, TrainConfig
from cairn.strategies.l2 import note_penalty
from cairn.workspace import Workspace


def run(model, stream, opts: EWCOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Each stage continues the previous one's model (LoRA: the same adapter) with loss +
    λ · Σ_j F_j (θ − θ*_j)², built from the earlier stages' contribution folders only; once trained,
    the stage's contributor computes its Fisher on its own data and ships it in its folder. The
    penalty never receives an earlier task: only `earlier`, a list of folders."""
    earlier: list[Path] = []
    for task in stream:
        loss = penalty(earlier, opts.lambda_) if earlier and opts.lambda_ else None
        model = work.train(model, task, cfg, extra_loss=loss, key=("ewc", [p.name for p in earlier], opts.model_dump()))
        folder = work.used[-1]
        if not (folder / FILE).is_file():  # the contributor ships its statistic while it holds its data
            own = work.config_for(task, cfg)

            def ship() -> None:  # the main process computes and writes it; under a launch the others wait
                fisher = diagonal_fisher(model, work.tokenizer, task.train, own.method, batch_size=opts.fisher_batch_size, max_length=own.max_length)
                save_fisher(fisher, folder, examples=len(task.train), batch_size=opts.fisher_batch_size)

            main_writes(ship)
        note_penalty(work)
        earlier.append(folder)
        yield model
