"""Checkpoints inside a training run, so an interrupted run resumes exactly where it stopped.

A run's checkpoint folder holds at most one complete checkpoint, `step-<N>/` (N optimizer steps
done). Each is written whole under a temporary name and renamed into place (`atomic_dir`), and the
older one is deleted only after that, so a kill at any moment leaves a complete checkpoint. It holds:

- `trainable.safetensors`: the trained parameters (the LoRA weights for LoRA, every weight for FFT);
- `trainer.pt`: the optimizer and scheduler states, torch's RNG states and the state the data-order
  generator had when the current epoch began (read back with `weights_only=True`, no code runs);
- `state.json`: the run's identity, the position (epoch, batches done in it, optimizer steps), the
  losses and token count so far, and Python's and NumPy's RNG states.

Resuming restores all of these, so the resumed run computes the same steps on the same batches
as an uninterrupted one: on CPU the final weights are bit-identical.

A training sharded by FSDP2 checkpoints its shards instead: every process writes its shards of
the trained parameters and of the optimizer state with `torch.distributed.checkpoint` into
`shards/` (no process gathers the whole state), and the main process writes the rest as above.
Resuming reads them back into the sharded model and optimizer, resharded if the number of
processes changed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cairn.io import atomic_dir

PREFIX = "step-"
STATE, WEIGHTS, TRAINER, SHARDS = "state.json", "trainable.safetensors", "trainer.pt", "shards"


def run_identity(config: dict, features: list[dict], params: dict[str, torch.Tensor]) -> str:
    """What a checkpoint must match to be resumed by this run: the training config, the token ids
    of every example in order, and the trainable parameters' names and shapes. (The start model's
    frozen weights are not hashed: callers key the checkpoint folder by the start model.)"""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(features).encode())
    h.update(json.dumps({name: list(p.shape) for name, p in params.items()}).encode())
    return h.hexdigest()


def rng_states() -> dict:
    """Every RNG a training step may draw from: torch (CPU and CUDA), Python's and NumPy's."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class Resume:
    """Where a checkpoint left off: `batch` batches of epoch `epoch` (0-based) are done."""

    epoch: int
    batch: int
    order: torch.Tensor  # the data-order generator's state when that epoch began
    progress: dict  # steps, tokens, losses, wall_s, peak_mem_mb so far
    rng: dict


@dataclass
class Checkpoints:
    """The checkpoints of one training run (identified by `run`) in `folder`."""

    folder: Path
    run: str
    sharded: object = None  # the FSDP2-sharded module being trained, whose shards every process saves and loads

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.folder.glob(f"{PREFIX}*") if (p / STATE).is_file())

    def latest_step(self) -> int | None:
        """Optimizer steps done in the checkpoint on disk (None when there is none)."""
        found = self._complete()
        return int(found[-1].name.removeprefix(PREFIX)) if found else None

    def resume(self, params: dict[str, torch.Tensor], optimizer, scheduler) -> Resume | None:
        """Load this run's newest checkpoint into `params`, `optimizer` and `scheduler`.

        Leftovers of interrupted writes and checkpoints of another run (other config or data)
        are deleted first; returns None when nothing is left to resume.
        """
        from safetensors.torch import load_file

        for stale in self.folder.glob(f".{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        found = self._complete()
        state = json.loads((found[-1] / STATE).read_text()) if found else None
        if state is None or state["run"] != self.run:
            for other in found:
                shutil.rmtree(other, ignore_errors=True)
            return None
        trainer = torch.load(found[-1] / TRAINER, weights_only=True)
        if self.sharded is not None:
            _load_shards(self.sharded, optimizer, found[-1] / SHARDS)
        else:
            weights = load_file(found[-1] / WEIGHTS)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name])
            optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        rng = {"torch": trainer["torch_rng"], "cuda": trainer["cuda_rng"], "python": state["python_rng"], "numpy": state["numpy_rng"]}
        return Resume(state["epoch"], state["batch"], trainer["order"], state["progress"], rng)

    def save(self, params: dict[str, torch.Tensor], optimizer, scheduler, *, epoch: int, batch: int, order: torch.Tensor, progress: dict) -> None:
        """Write the checkpoint after `progress["steps"]` optimizer steps, then delete the older one.
        Sharded: every process calls it, and every process returns once the checkpoint is in place."""
        from safetensors.torch import save_file

        from cairn.distributed import barrier, is_main

        step = progress["steps"]
        rng = rng_states()
        size = 3 * sum(p.numel() * p.element_size() for p in params.values())  # weights and AdamW's two moments
        shards = self.folder / f".{PREFIX}{step:08d}.{SHARDS}"  # one name for every process; a leftover is removed by `resume`
        if self.sharded is not None:
            _save_shards(self.sharded, optimizer, shards)
            if not is_main():
                barrier()
                return
        with atomic_dir(self.folder / f"{PREFIX}{step:08d}", needed=size) as tmp:
            if self.sharded is not None:
                shards.rename(tmp / SHARDS)
            else:
                save_file({name: p.detach().contiguous() for name, p in params.items()}, tmp / WEIGHTS)
            trainer = {"scheduler": scheduler.state_dict(), "order": order, "torch_rng": rng["torch"], "cuda_rng": rng["cuda"]}
            if self.sharded is None:
                trainer["optimizer"] = optimizer.state_dict()
            torch.save(trainer, tmp / TRAINER)
            state = {"run": self.run, "step": step, "epoch": epoch, "batch": batch, "progress": progress, "python_rng": rng["python"], "numpy_rng": rng["numpy"]}
            (tmp / STATE).write_text(json.dumps(state))
        for older in self._complete():
            if older.name != f"{PREFIX}{step:08d}":
                shutil.rmtree(older, ignore_errors=True)
        if self.sharded is not None:
            barrier()


def _sharded_state(module, optimizer) -> dict:
    """The trainable parameters' and the optimizer's state of an FSDP2-sharded `module`, as this
    process's shards (DTensors), keyed as `torch.distributed.checkpoint` saves and loads them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    weights, moments = get_state_dict(module, inner, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return {"model": weights, "optim": moments}


def _save_shards(module, optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(module, optimizer), checkpoint_id=folder)


def _load_shards(module, optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=folder)
    inner = getattr(optimizer, "optimizer", optimizer)
    set_state_dict(module, inner, model_state_dict=state["model"], optim_state_dict=state["optim"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
