"""Merging LoRA adapters factor by factor, as PEFT's `add_weighted_adapter` does (`combine: factors`).

Each module's lora_A matrices are merged among themselves, and its lora_B matrices among
themselves, by PEFT's combination type (`FACTOR_METHODS`: linear, ties, dare_linear, dare_ties).
Adapter i enters with weight wᵢ = λ · weightᵢ, split between its factors as PEFT splits it: A is
scaled by sign(wᵢsᵢ)·sqrt(|wᵢsᵢ|) and B by sqrt(|wᵢsᵢ|), sᵢ being the adapter's LoRA scale. The
product of the merged factors is not a merge of the ΔWᵢ = sᵢBᵢAᵢ (cross terms BᵢAⱼ enter): this is
the reference study's path, kept beside the exact-delta merges (`streaming.py`) to compare them.

PEFT's semantics, per factor: TIES keeps each tensor's top int(density·n) entries by magnitude,
elects each entry's sign from the sum of the pruned tensors before weighting, and divides the
weighted agreeing entries' sum by their count; DARE keeps each entry with probability `density`
and rescales survivors by 1/density. DARE draws from NumPy, seeded per module and factor by
`seed`, where PEFT draws from torch's global generator: equal in distribution, not draw by draw.
One input merges as `linear`, as in PEFT. Everything is computed in float32, from the adapter
files alone: no model is loaded.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cairn.errors import ConfigError, ModelError
from cairn.io import atomic_dir
from cairn.manifest import contribution_manifest, tasks_of
from cairn.methods.merge.methods import seed_for
from cairn.options import FACTOR_METHODS, MergeOptions
from cairn.weights.adapters import adapter_config, read_lora


def _magnitude_prune(t: np.ndarray, density: float) -> np.ndarray:
    """`t` with all but its int(density·n) largest-magnitude entries set to 0 (PEFT's magnitude pruning)."""
    flat = np.abs(t).reshape(-1)
    k = int(density * flat.size)
    keep = np.zeros(flat.size, bool)
    if k:
        keep[np.argpartition(-flat, k - 1)[:k]] = True
    return t * keep.reshape(t.shape)


def combine_factor(tensors: list[np.ndarray], weights: np.ndarray, kind: str, density: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """One factor (all inputs' lora_A, or all their lora_B, of one module) merged by PEFT's
    `kind` (linear, ties, dare_linear, dare_ties) with float32 `weights`; `rng` draws DARE's drops."""
    stack = np.stack(tensors).astype(np.float32, copy=False)
    if density < 1 and kind in ("ties", "dare_ties", "dare_linear"):
        if kind == "ties":
            stack = np.stack([_magnitude_prune(t, density) for t in stack])
        else:
            stack = np.stack([t * (rng.random(t.shape, dtype=np.float32) < density) / np.float32(density) for t in stack])
    weighted = stack * weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    if kind in ("linear", "dare_linear"):
        return weighted.sum(axis=0)
    agree = np.sign(stack) == np.where(stack.sum(axis=0) >= 0, 1, -1)
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1).astype(np.float32)


def factor_weights(weight: float, scale: float) -> tuple[float, float]:
    """(A's weight, B's weight) of an adapter of LoRA scale `scale` merged with weight `weight`:
    the square root of |weight·scale| each, its sign on A's."""
    ws = weight * scale
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


def merge_factors(inputs: list[str | Path], out: str | Path, opts: MergeOptions, *, weights: list[float] | None = None, made_from: dict) -> dict:
    """Merge the LoRA adapters `inputs` (of the base `base`) factor by factor into the PEFT adapter
    `out`, written atomically with its manifest (`made_from`: its provenance); returns the merge's
    statistics. The merged adapter's scale is 1 (lora_alpha = r)."""
    start = time.perf_counter()
    weights = list(weights) if weights is not None else [1.0] * len(inputs)
    full = [str(p) for p in inputs if not (Path(p) / "adapter_config.json").is_file()]
    if full:
        raise ConfigError(f"combine: factors merges LoRA adapters only, and {', '.join(full)} {'is a full model' if len(full) == 1 else 'are full models'} (no adapter_config.json); use combine: delta")
    loras = [read_lora(p) for p in inputs]
    if len({f for lora in loras for *_, f in lora.values()}) > 1:
        raise ModelError(f"{', '.join(map(str, inputs))}: some adapters are fan_in_fan_out and some are not; their factors cannot be merged")
    kind = FACTOR_METHODS[opts.method] if len(inputs) > 1 else "linear"
    modules = sorted({m for lora in loras for m in lora})
    state, ranks = {}, {}
    for module in modules:
        present = [(lora[module], w) for lora, w in zip(loras, weights) if module in lora]
        rank = {a.shape[0] for (a, *_), _ in present}
        if len(rank) > 1:
            raise ModelError(f"module {module!r} has ranks {sorted(rank)} across the inputs; combine: factors needs one rank per module (PEFT's add_weighted_adapter too)")
        ranks[module] = rank.pop()
        split = [factor_weights(opts.lambda_ * w, scale) for (_, _, scale, _), w in present]
        for i, part in enumerate("AB"):
            rng = np.random.default_rng(seed_for(opts.seed, f"{module}.lora_{part}")) if kind.startswith("dare") else None
            merged = combine_factor([f[i] for f, _ in present], np.asarray([s[i] for s in split], np.float32), kind, opts.density, rng)
            state[f"base_model.model.{module}.lora_{part}.weight"] = np.ascontiguousarray(merged)
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {m: k for m, k in ranks.items() if k != r}
    config = {**adapter_config(Path(inputs[0])), "r": r, "lora_alpha": r, "rank_pattern": odd, "alpha_pattern": odd, "target_modules": modules,
              "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": str(made_from["base"])}  # fmt: skip
    stats = {"method": opts.method, "combine": "factors", "combination_type": kind, "options": opts.model_dump(by_alias=True), "weights": weights,
             "inputs": [str(p) for p in inputs], "modules": len(modules), "rank": r}  # fmt: skip
    from safetensors.numpy import save_file

    with atomic_dir(Path(out), needed=sum(t.nbytes for t in state.values())) as tmp:
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        stats["wall_s"] = round(time.perf_counter() - start, 3)
        contribution_manifest(tmp, "merge", stats, kind="adapter", task=tasks_of(inputs), method=f"merge-{opts.method}-factors", made_from=made_from)
    return stats
