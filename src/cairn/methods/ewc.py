"""EWC: an elastic penalty holding each weight near its value after every earlier stage, weighted by
how much that stage's task relied on it (its diagonal Fisher information).

Loss = task loss + λ · Σ_{j<s} Σ_i F_j,i · (θ_i − θ*_j,i)², over the trained weights θ (Kirkpatrick
et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, with one penalty per
earlier task; their λ/2 is λ here, as in TRACE's `model/Regular/EWC.py` and EasyCL's
`cl/ewc/ewc.py`, whose penalties Σ F·(θ − θ*)² carry no ½). θ*_j is the model after stage j; for
LoRA the trained weights are the adapter's A and B, one adapter carried through all stages (as
EasyCL's EWC over the `lora_` parameters).

F_j,i is the empirical diagonal Fisher of stage j's contribution on its own training examples:
the mean over batches of `batch_size` examples (default 1: per example) of the squared gradient of
the batch's answer loss (the training loss: mean cross-entropy over the answer tokens), with the
data's answers as labels (empirical, as TRACE and EasyCL; Kirkpatrick et al. draw the labels from
the model). TRACE sums the squared gradients of every training step, all epochs, while the weights
move, and divides by the batches of one epoch; EasyCL sums squared batch gradients of the trained
model over its first 100 examples and divides by their count. Both read the data; so does this,
but only the contributor does: the Fisher is a statistic it
computes while it still holds its data and ships in its contribution folder, `fisher.safetensors`,
beside the weights, under the same tensor names as the weights file (`adapter_model.safetensors` or
`model.safetensors`) and with metadata `examples` and `batch_size`. A later stage's penalty is built
from contribution folders alone (`penalty(contributions, λ)`): EWC is semi-collaborative.

The j penalties are one quadratic: Σ_j F_j (θ − θ*_j)² = F (θ − μ)² + c with F = Σ_j F_j,
μ = Σ_j F_j θ*_j / F (0 where F = 0) and c = Σ_j F_j θ*_j² − F μ² (a constant per tensor, kept so
the value, not only the gradient, is the formula's): two tensors per weight whatever the number of stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from cairn.data.batching import collate, encode, pad_id
from cairn.errors import ModelError

FILE = "fisher.safetensors"
ADAPTER = "default"  # the adapter name Cairn trains under; PEFT saves its weights without it


def saved_name(parameter: str) -> str:
    """The name a parameter of a trained model has in its saved weights file: PEFT drops the adapter name."""
    return parameter.replace(f".{ADAPTER}.", ".") if ".lora_" in parameter else parameter


def diagonal_fisher(model, tokenizer, examples, method: str, *, batch_size: int = 1, max_length: int = 1024) -> dict[str, Tensor]:
    """{saved name: F} for the weights a `method` stage trains: the mean over consecutive batches of
    `batch_size` examples of the squared gradient of the batch's mean answer-token cross-entropy,
    in float32, weights unchanged."""
    from cairn.training import answer_loss, is_trained

    if not examples:
        raise ModelError("no examples to compute the Fisher information from")
    named = {name: p for name, p in model.named_parameters() if is_trained(name, method)}
    if not named:
        raise ModelError(f"the model has no weights a {method} stage trains (LoRA: no lora_ parameters)")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for name, p in model.named_parameters():
        p.requires_grad_(name in named)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    features = [encode(ex, tokenizer, max_length) for ex in examples]
    batches = [features[i : i + batch_size] for i in range(0, len(features), batch_size)]
    device = next(iter(named.values())).device
    model.eval()  # no dropout: the Fisher of the model as it is
    try:
        for part in batches:
            batch = {k: v.to(device) for k, v in collate(part, pad_id(tokenizer)).items()}
            model.zero_grad(set_to_none=True)
            loss, _ = answer_loss(model, batch)
            loss.backward()
            for name, p in named.items():
                if p.grad is not None:
                    sums[name] += p.grad.float().pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return {saved_name(name): (s / len(batches)).contiguous() for name, s in sums.items()}


def save_fisher(fisher: dict[str, Tensor], folder: str | Path, *, examples: int, batch_size: int) -> Path:
    """Write `fisher.safetensors` into the contribution `folder` (through a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(folder) / FILE
    tmp = path.with_suffix(".tmp")
    save_file(fisher, tmp, metadata={"examples": str(examples), "batch_size": str(batch_size)})
    tmp.replace(path)
    return path


def load_fisher(folder: str | Path) -> dict[str, Tensor]:
    """The Fisher information shipped in the contribution `folder`; a clear error where there is none."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        raise ModelError(
            f"{path} not found: EWC needs the Fisher information each earlier contributor computes on its own training data and ships "
            "with its contribution (the ewc strategy saves it with every stage; for another contribution, its owner can compute it "
            "with cairn.methods.ewc.diagonal_fisher and save_fisher)"
        )
    return load_file(path)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "adapter_model.safetensors").is_file():
        return [folder / "adapter_model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelError(f"{folder}: no adapter_model.safetensors or model.safetensors: not a contribution folder")


def load_anchor(folder: str | Path, names) -> dict[str, Tensor]:
    """The contribution's own weights θ* (float32) under `names` (saved names), read from its weights file(s)."""
    from safetensors import safe_open

    folder, wanted, out = Path(folder), set(names), {}
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                out[key] = f.get_tensor(key).float()
    missing = sorted(wanted - set(out))
    if missing:
        raise ModelError(f"{folder / FILE} names {len(missing)} tensor(s) the contribution's weights lack, e.g. {missing[0]!r}: the Fisher file belongs to another model")
    return out


def consolidate(fishers: list[Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor, float]:
    """(F, μ, c) with Σ_j F_j (θ − θ*_j)² = Σ F (θ − μ)² + c for every θ (c summed over the tensor)."""
    f = torch.stack([x.double() for x in fishers]).sum(0)
    weighted = torch.stack([x.double() * a.double() for x, a in zip(fishers, anchors, strict=True)]).sum(0)
    mu = torch.where(f > 0, weighted / f.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(f))
    c = float(sum((x.double() * a.double().pow(2)).sum() for x, a in zip(fishers, anchors)) - (f * mu.pow(2)).sum())
    return f.float(), mu.float(), c


def quadratic(params: list[Tensor], terms: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """Σ over tensors of Σ F (θ − μ)² + c, for `terms` (F, μ, c) from `consolidate`."""
    parts = [(f * (p.float() - mu).pow(2)).sum() + c for p, (f, mu, c) in zip(params, terms, strict=True)]
    return torch.stack(parts).sum() if parts else torch.zeros(())


def _fisher_path(folder: Path) -> Path:
    path = folder / FILE
    if not path.is_file():
        load_fisher(folder)  # its error names what is missing
    return path


def consolidated_terms(contributions: list[Path]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{saved name: (F, μ, c)} of the earlier contributions' folders (their shipped Fisher F_j and
    weights θ*_j), read one tensor name at a time from all of them: memory for F and μ, not for
    every stage's Fisher and weights."""
    from contextlib import ExitStack

    from safetensors import safe_open

    if not contributions:
        raise ModelError("EWC's penalty needs at least one earlier contribution")
    with ExitStack() as stack:
        fishers, weights = [], []
        for folder in map(Path, contributions):
            fishers.append(stack.enter_context(safe_open(_fisher_path(folder), framework="pt")))
            handles = [stack.enter_context(safe_open(file, framework="pt")) for file in _weight_files(folder)]
            weights.append({key: h for h in handles for key in h.keys()})
        names = set(fishers[0].keys())
        for folder, fisher in zip(contributions[1:], fishers[1:]):
            if set(fisher.keys()) != names:
                raise ModelError(f"{Path(folder) / FILE} names other tensors than {Path(contributions[0]) / FILE}: the contributions were not trained alike")
        terms = {}
        for name in sorted(names):
            for folder, held in zip(contributions, weights):
                if name not in held:
                    raise ModelError(f"{Path(folder) / FILE} names {name!r}, which the contribution's weights lack: the Fisher file belongs to another model")
            terms[name] = consolidate([f.get_tensor(name).float() for f in fishers], [w[name].get_tensor(name).float() for w in weights])
    return terms


def penalty(contributions: list[Path], lam: float):
    """The `extra_loss` of an EWC stage, from the earlier contributions' folders alone (their weights
    θ*_j and shipped Fisher F_j): λ · Σ_j Σ F_j (θ − θ*_j)² over the trained weights of the model
    training calls it with, which must be the weights the Fisher files name."""
    terms = consolidated_terms(contributions)
    resolved: list = []

    def loss(model) -> Tensor:
        if not resolved:
            params = {saved_name(name): p for name, p in model.named_parameters() if p.requires_grad}
            missing = sorted(set(terms) - set(params))
            if missing:
                raise ModelError(f"{Path(contributions[-1]) / FILE} names {missing[0]!r}, which the model being trained does not train")
            resolved.extend((params[name], tuple(t.to(params[name].device) if isinstance(t, Tensor) else t for t in terms[name])) for name in sorted(terms))
        return lam * quadratic([p for p, _ in resolved], [t for _, t in resolved])

    return loss
