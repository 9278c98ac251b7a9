"""Routing statistics a contributor ships with its contribution: for each module, the mean and
per-dimension variance, over its own training prompts, of the prompt-averaged input entering that
module (as the base model reads them, for a LoRA contribution: the router reads prompts that way). A few hundred numbers per module, no data, yet enough for a mixer to tell which prompts
look like that contributor's (the `centroid` router of LoRA-MoE and of the Mixtral export).

File: `centroids.safetensors` in the contribution folder, keys `<module>.mean` and `<module>.var`
(float32 vectors of the module's input width), metadata `prompts` (how many were averaged).
Module names are the base model's (`model.layers.3.self_attn.q_proj`; `model.layers.3.mlp` for a
whole MLP).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cairn.data.batching import left_padded, pad_id
from cairn.errors import ModelError
from cairn.models import causal_lm_of

FILE = "centroids.safetensors"


def mlp_modules(model) -> list[str]:
    """The names of the MLP blocks of a Llama-family model (the experts of a Mixtral export)."""
    return [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]


def pooled(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, length, width) -> (batch, width): the mean over each row's real (unmasked) tokens."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


@torch.no_grad()
def input_statistics(model, tokenizer, prompts: list[str], modules: list[str], *, batch_size: int = 16, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """{`<module>.mean`, `<module>.var`}: statistics over `prompts` of each module's prompt-averaged
    input, read with forward hooks during ordinary forward passes of `model` (for a PeftModel, of
    its base model with whatever adapter is active). With `max_length`, each prompt keeps its
    last `max_length` tokens, as training keeps them (data/batching.py)."""
    if not prompts:
        raise ModelError("no prompts to compute routing statistics from")
    inner = causal_lm_of(model)
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def record(_module, args):
            v = pooled(args[0].detach().double(), mask_now[0])
            sums[name] = sums.get(name, 0) + v.sum(0)
            squares[name] = squares.get(name, 0) + v.pow(2).sum(0)

        return record

    handles = []
    try:
        for name in modules:
            handles.append(inner.get_submodule(name).register_forward_pre_hook(hook(name)))
        was_training = model.training
        model.eval()
        pad = pad_id(tokenizer)
        for i in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[i : i + batch_size]]
            encoded = [seq[-max_length:] for seq in encoded] if max_length else encoded
            ids, mask = left_padded(encoded, pad)  # as generation reads prompts
            mask_now[:] = [mask]
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generation numbers left-padded tokens
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    n = len(prompts)
    out = {}
    for name in modules:
        mean = sums[name] / n
        out[f"{name}.mean"] = mean.float()
        out[f"{name}.var"] = (squares[name] / n - mean.pow(2)).clamp_min(0).float()
    return out


def save(stats: dict[str, torch.Tensor], folder: str | Path, prompts: int) -> Path:
    """Write `centroids.safetensors` into `folder` (through a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(folder) / FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in stats.items()}, tmp, metadata={"prompts": str(prompts)})
    tmp.replace(path)
    return path


def load(folder: str | Path) -> dict[str, torch.Tensor]:
    """The statistics shipped in `folder`; a clear error when the contributor did not ship them."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        raise ModelError(
            f"{path} not found: the centroid router needs the routing statistics each contributor computes on its "
            "own training prompts (saved with every contribution Cairn trains; for another one, the contributor can "
            "compute them with cairn.methods.moe.statistics.input_statistics and save)"
        )
    try:
        return load_file(path)
    except Exception as exc:  # safetensors' own error type for a malformed file
        raise ModelError(f"{path}: cannot read ({exc})") from exc
