"""Merge HF model folders and PEFT adapters on disk, one parameter at a time.

Each input is read lazily (memory-mapped, pages released after use), so memory holds one
parameter of every input at a time, never whole models. An adapter enters a merge as the full
model it stands for: its task vector on a module is the exact ΔW = scale · B · A (merging A and
B separately is a different function: `combine: factors`, in `factors.py`, where this hands off).
The output is a full HF folder, or a PEFT adapter made by truncated SVD of the merged deltas of
the linear layers.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from cairn.errors import ConfigError, ModelError
from cairn.io import atomic_dir
from cairn.manifest import contribution_manifest, tasks_of
from cairn.methods.merge.factors import merge_factors
from cairn.methods.merge.methods import merge_tensor
from cairn.options import MergeOptions
from cairn.progress import bar as progress_bar
from cairn.weights.adapters import AdapterWeights, open_input
from cairn.weights.tensor_files import FolderWeights, SafetensorsWriter

_WEIGHT_FILES = re.compile(r"(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|cairn\.json)$")


def merge_models(
    base: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    opts: MergeOptions,
    *,
    weights: list[float] | None = None,
    adapter_rank: int | None = None,
    dtype: str | None = None,
    progress: bool = True,
    made_from: dict,
) -> dict:
    """Merge `inputs` onto the HF folder `base`; write a HF folder (or, with `adapter_rank`, a PEFT
    adapter) to `out` atomically, and return the merge's statistics. `dtype` (a safetensors name:
    F32, BF16, F16) sets the full output's floating dtype; by default it is the base's.
    `made_from`: the manifest's provenance (`base`, `base_fingerprint`, ...)."""
    if not inputs:
        raise ModelError("nothing to merge: give at least one input")
    weights = list(weights) if weights is not None else [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise ModelError(f"{len(weights)} weights for {len(inputs)} inputs: give one weight per input")
    if opts.combine == "factors":
        if adapter_rank is not None or dtype is not None:
            raise ConfigError("combine: factors writes an adapter of its inputs' rank, in float32: drop --rank / --as-adapter and dtype")
        return merge_factors(inputs, out, opts, weights=weights, made_from=made_from)
    start = time.perf_counter()
    base_w = FolderWeights(base)
    sources = [open_input(p, base_w) for p in inputs]
    names = base_w.keys()
    stats = {"method": opts.method, "options": opts.model_dump(by_alias=True), "weights": weights, "inputs": [str(p) for p in inputs], "tensors": len(names), "dtype": dtype}
    try:
        size = sum((Path(base) / f).stat().st_size for f in set(base_w.where.values()))
        with atomic_dir(Path(out), needed=size if adapter_rank is None else size // 100) as tmp:
            known = {}
            if adapter_rank is None:
                known = _write_full(base_w, sources, names, opts, weights, tmp, progress, dtype)
                for f in Path(base).iterdir():  # config, tokenizer, generation config
                    if f.is_file() and not _WEIGHT_FILES.fullmatch(f.name):
                        shutil.copy2(f, tmp / f.name)
                if dtype and (tmp / "config.json").is_file():  # the config names the weights' dtype
                    config = json.loads((tmp / "config.json").read_text())
                    for key in ("dtype", "torch_dtype"):
                        if key in config or key == "dtype":
                            config[key] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
                    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            else:
                stats["svd"] = _write_adapter(base_w, sources, names, opts, weights, tmp, adapter_rank, str(made_from["base"]), progress)
            stats["wall_s"] = round(time.perf_counter() - start, 3)
            contribution_manifest(tmp, "merge", stats, kind="adapter" if adapter_rank else "model", task=tasks_of(inputs), method=f"merge-{opts.method}", made_from=made_from, known=known)
    finally:
        for s in [base_w, *sources]:
            s.close()
    return stats


def _merged_in_order(base_w, sources, names, opts, weights, progress, desc):
    """Yield (name, base tensor, merged tensor) in order, releasing each parameter's pages after."""
    # Where every input is an adapter, a parameter none of them touches (the embeddings: a fifth of
    # this model) merges to the base unless the method moves equal inputs: nothing to compute.
    skip = opts.keeps_the_base() and all(isinstance(s, AdapterWeights) for s in sources)
    touched = set().union(*(s.deltas for s in sources)) if skip else set(names)
    for name in progress_bar(names, desc=desc, disable=not progress, leave=False):
        base = base_w.get(name)
        if name in touched:
            yield name, base, merge_tensor(opts, name, base, [s.get(name) for s in sources], weights)
        else:
            yield name, base, base
        base_w.release(name)
        for src in sources:
            src.release(name)


_FLOATS = ("F64", "F32", "F16", "BF16")


def _write_full(base_w, sources, names, opts, weights, tmp, progress, dtype=None) -> dict[str, str]:
    """Write the merged model.safetensors; returns its sha256 for the manifest."""
    specs = [(n, dtype if dtype and base_w.meta(n)[0] in _FLOATS else base_w.meta(n)[0], base_w.meta(n)[1]) for n in names]
    writer = SafetensorsWriter(tmp / "model.safetensors", specs, metadata={"format": "pt"})
    try:
        for name, _, merged in _merged_in_order(base_w, sources, names, opts, weights, progress, f"merging ({opts.method})"):
            writer.write(name, merged)
    finally:
        writer.close()
    return {"model.safetensors": writer.digest}


def _write_adapter(base_w, sources, names, opts, weights, tmp, rank, base_ref, progress):
    """Truncated SVD of each linear layer's merged delta: ΔW ≈ B·A with B = U_r·S_r, A = V_rᵀ."""
    from safetensors.numpy import save_file

    state, modules = {}, []
    err2 = kept2 = dropped2 = 0.0
    for name, base, merged in _merged_in_order(base_w, sources, names, opts, weights, progress, f"merging ({opts.method}) to rank {rank}"):
        delta = merged.astype(np.float32) - base.astype(np.float32)
        norm2 = float(np.square(delta, dtype=np.float64).sum())
        if norm2 == 0:
            continue
        module = name.removesuffix(".weight")
        if delta.ndim != 2 or not name.endswith(".weight") or "embed" in name or "lm_head" in name:
            dropped2 += norm2  # not a linear layer PEFT can adapt here: not representable
            continue
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.size)
        b, a = u[:, :r] * s[:r], vh[:r]
        state[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        state[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b)
        kept2 += norm2
        err2 += float(np.square(s[r:], dtype=np.float64).sum())
        modules.append(module)
    if not modules:
        raise ModelError("the merged model equals the base on every linear layer: there is no adapter to write")
    save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
        "r": rank, "lora_alpha": rank, "target_modules": modules, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }  # fmt: skip
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    total2 = kept2 + dropped2
    return {
        "rank": rank,
        "modules": len(modules),
        "relative_error": ((err2 + dropped2) / total2) ** 0.5,  # ‖ΔW − B·A‖_F / ‖ΔW‖_F over all tensors
        "relative_error_linear": (err2 / kept2) ** 0.5 if kept2 else 0.0,
        "dropped_fraction": (dropped2 / total2) ** 0.5,  # share of the delta's norm outside linear layers
    }

