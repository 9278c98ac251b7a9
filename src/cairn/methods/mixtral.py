"""Export full fine-tunes of one Llama-family base as a standard Mixtral MoE model (a HF folder).

Each fine-tune's MLP of layer i becomes expert k of layer i, in the Hub layout
`model.layers.{i}.block_sparse_moe.experts.{k}.w1/w2/w3.weight` (w1 = gate_proj, w2 = down_proj,
w3 = up_proj), with a router `model.layers.{i}.block_sparse_moe.gate.weight` (experts x hidden).
Attention, norms and embeddings come from the base or the inputs' mean. The folder loads with plain
transformers (`MixtralForCausalLM`); `reference_model` is Cairn's own model of the same mixture (a
`LlamaForCausalLM` whose MLPs are `MoeMLP`s), written from the math, to check the export against.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from cairn.errors import ModelError
from cairn.methods.merge_models import open_input
from cairn.methods.routing import topk_weights
from cairn.io import atomic_dir
from cairn.store import file_hashes, write_manifest
from cairn.tensor_files import STORAGE, FolderWeights, SafetensorsWriter, stored

ROUTERS = ("centroid", "random", "uniform")
SHARED = ("base", "average")
DEFAULT_TEMPERATURE = 1.0
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's names for Llama's
_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
# Weights, config and manifest are written anew; tokenizer files, generation config etc. are copied.
_NOT_COPIED = re.compile(r"(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|config\.json|cairn\.json|centroids\.safetensors)$")


# --- routers: pure math ---------------------------------------------------------------------


def centroid_router(centroids: np.ndarray, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Gate rows (experts x hidden) from the experts' centroids (experts x hidden) of one layer.

    The centroids are centred on their mean m across experts and the direction of m is projected
    out: d_k = P(c_k − m) with P = I − m mᵀ/‖m‖². The gate has no bias, so without the projection
    the common component every hidden state carries would add a fixed m·d_k to expert k's logit on
    every token, outweighing the differences that matter. Row k is d_k/‖d_k‖ / (temperature · r),
    r the root-mean-square of the ‖d_k‖ (the centroids' spread), so logits are measured in units of
    that spread: a hidden state at c_k scores ‖d_k‖/(temperature · r) ≈ 1/temperature for k and,
    by Cauchy–Schwarz, less for every other expert (strictly, unless two d's point the same way).
    With two experts and temperature 1 it gets top-2 weight σ(2) ≈ 0.88 at its own centroid;
    lower temperatures route harder, higher ones approach the uniform mixture. Identical centroids
    (one expert, or identical inputs) give zero rows: all experts equal.
    """
    if not temperature > 0:
        raise ModelError(f"router temperature must be positive, got {temperature}")
    c = np.asarray(centroids, np.float64)
    mean = c.mean(axis=0)
    d = c - mean
    mean2 = float(mean @ mean)
    if mean2 > 0:
        d -= np.outer(d @ mean / mean2, mean)
    lengths = np.linalg.norm(d, axis=1)
    spread = float(np.sqrt(np.mean(lengths**2)))
    rows = np.zeros_like(d)
    keep = lengths > 1e-6 * spread
    if spread > 0:
        rows[keep] = d[keep] / lengths[keep, None] / (temperature * spread)
    return rows.astype(np.float32)


def random_router(n_layers: int, n_experts: int, hidden: int, std: float, seed: int) -> np.ndarray:
    """(layers, experts, hidden) gate rows drawn from N(0, std²) with a seeded generator."""
    return (np.random.default_rng(seed).standard_normal((n_layers, n_experts, hidden)) * std).astype(np.float32)


# --- reading the inputs ---------------------------------------------------------------------


def _llama_config(base: Path):
    """The base's LlamaConfig; refuses models Mixtral cannot represent (other architectures,
    biased attention or MLP, a non-silu MLP)."""
    from transformers import LlamaConfig

    path = base / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read ({exc}); a HF model folder was expected") from exc
    if raw.get("model_type") != "llama":
        raise ModelError(
            f"{base}: model_type {raw.get('model_type')!r} ({', '.join(raw.get('architectures') or ['no architectures'])}); "
            "only Llama-family models (model_type 'llama', LlamaForCausalLM) can be exported as Mixtral"
        )
    config = LlamaConfig.from_pretrained(str(base))
    if config.attention_bias or config.mlp_bias:
        raise ModelError(f"{path}: attention_bias/mlp_bias are set; Mixtral has no biases, so this model cannot be exported")
    if config.hidden_act != "silu":
        raise ModelError(f"{path}: hidden_act is {config.hidden_act!r}; Mixtral export expects silu-gated MLPs")
    return config


def mixtral_config(llama, n_experts: int, top_k: int):
    """A MixtralConfig with the Llama base's sizes, rope, vocabulary and special tokens."""
    from transformers import MixtralConfig

    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "attention_dropout", "rope_parameters")  # fmt: skip
    config = MixtralConfig(
        **{k: getattr(llama, k) for k in same},
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    config.architectures = ["MixtralForCausalLM"]
    if getattr(llama, "dtype", None) is not None:
        config.dtype = llama.dtype
    return config


def read_centroids(folder: Path, n_layers: int, hidden: int) -> np.ndarray:
    """(layers, hidden) mean inputs of the MLPs from `folder`'s centroids.safetensors."""
    from cairn.methods import centroids

    stats = centroids.load(folder)
    out = np.empty((n_layers, hidden), np.float32)
    for i in range(n_layers):
        key = f"model.layers.{i}.mlp.mean"
        if key not in stats:
            raise ModelError(f"{folder / centroids.FILE}: no {key!r}; the centroid router needs every layer's MLP input mean")
        v = stats[key]
        if tuple(v.shape) != (hidden,):
            raise ModelError(f"{folder / centroids.FILE}: {key!r} has shape {list(v.shape)}, expected [{hidden}] (the hidden size)")
        out[i] = v.float().numpy()
    return out


class _Mixture:
    """The validated inputs of an export, and every output tensor computed from them on request."""

    def __init__(self, base, inputs, *, router, top_k, shared, temperature, seed):
        if not inputs:
            raise ModelError("nothing to export: give at least one fine-tuned model (one expert each)")
        if router not in ROUTERS:
            raise ModelError(f"unknown router {router!r}; expected one of {', '.join(ROUTERS)}")
        if shared not in SHARED:
            raise ModelError(f"unknown shared {shared!r}; expected one of {', '.join(SHARED)}")
        if not 1 <= top_k <= len(inputs):
            raise ModelError(f"top_k is {top_k} with {len(inputs)} experts: it must be between 1 and the number of inputs")
        self.base, self.inputs, self.top_k, self.shared = Path(base), [Path(p) for p in inputs], top_k, shared
        self.llama = _llama_config(self.base)
        n_layers, hidden, n = self.llama.num_hidden_layers, self.llama.hidden_size, len(inputs)
        self.base_w = FolderWeights(self.base)
        self.sources = []
        try:
            self.sources = [open_input(p, self.base_w) for p in self.inputs]
            self.mlp, self.shared_names = self._split(n_layers)
            if router == "centroid":
                cs = np.stack([read_centroids(p, n_layers, hidden) for p in self.inputs], axis=1)
                self.gates = np.stack([centroid_router(cs[i], temperature) for i in range(n_layers)])
            elif router == "random":
                self.gates = random_router(n_layers, n, hidden, self.llama.initializer_range, seed)
            else:
                self.gates = np.zeros((n_layers, n, hidden), np.float32)
        except BaseException:
            self.close()
            raise

    def _split(self, n_layers):
        """{(layer, projection): name} of the base's MLP weights, and the names of the others."""
        mlp, rest = {}, []
        for name in self.base_w.keys():
            m = _MLP.fullmatch(name)
            if not m:
                rest.append(name)
                continue
            layer, what = int(m.group(1)), m.group(2)
            proj = what.removesuffix(".weight")
            if proj not in _PROJECTIONS or not what.endswith(".weight") or layer >= n_layers:
                raise ModelError(f"{self.base}: tensor {name!r} is not a Llama MLP weight (gate_proj/up_proj/down_proj of layers 0..{n_layers - 1})")
            mlp[layer, proj] = name
        for i in range(n_layers):
            for proj in _PROJECTIONS:
                if (i, proj) not in mlp:
                    raise ModelError(f"{self.base}: no tensor 'model.layers.{i}.mlp.{proj}.weight'; a Llama MLP was expected in every layer")
        return mlp, rest

    def gate_dtype(self) -> str:
        return self.base_w.meta(self.mlp[0, "gate_proj"])[0]

    def plan(self) -> list[tuple[str, str, list[int], Callable[[], np.ndarray]]]:
        """(output name, dtype, shape, make) of every output tensor, layer by layer in base order."""
        out, done = [], set()
        n, hidden = len(self.sources), self.llama.hidden_size
        for name in self.base_w.keys():
            m = _MLP.fullmatch(name)
            if not m:
                out.append((name, *self.base_w.meta(name), lambda name=name: self.shared_tensor(name)))
                continue
            layer = int(m.group(1))
            if layer in done:
                continue
            done.add(layer)
            prefix = f"model.layers.{layer}.block_sparse_moe"
            out.append((f"{prefix}.gate.weight", self.gate_dtype(), [n, hidden], lambda layer=layer: self.gates[layer]))
            for k in range(n):
                for proj in ("gate_proj", "down_proj", "up_proj"):  # w1, w2, w3
                    src = self.mlp[layer, proj]
                    make = lambda k=k, src=src: self.expert_tensor(k, src)  # noqa: E731
                    out.append((f"{prefix}.experts.{k}.{_EXPERT_NAMES[proj]}.weight", *self.base_w.meta(src), make))
        return out

    def expert_tensor(self, k: int, name: str) -> np.ndarray:
        t = np.array(self.sources[k].get(name))
        self.sources[k].release(name)
        return t

    def shared_tensor(self, name: str) -> np.ndarray:
        """The base's tensor, or the elementwise mean of the inputs' (accumulated in float32)."""
        if self.shared == "base":
            t = np.array(self.base_w.get(name))
            self.base_w.release(name)
            return t
        acc = np.zeros(self.base_w.meta(name)[1], np.float32)
        for s in self.sources:
            acc += s.get(name)
            s.release(name)
        return acc / np.float32(len(self.sources))

    def close(self) -> None:
        for s in [self.base_w, *self.sources]:
            s.close()


# --- export ---------------------------------------------------------------------------------


def export_mixtral(
    base: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    *,
    router: str = "centroid",
    top_k: int = 2,
    shared: str = "base",
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
    manifest: dict | None = None,
) -> dict:
    """Write to `out` (atomically) a Mixtral HF folder whose expert k is `inputs[k]`'s MLPs, all
    fine-tuned from the Llama folder `base`; return the export's statistics (the manifest's "mix").

    router: `centroid` (from each input's centroids.safetensors; see `centroid_router` for the
    scale `temperature`), `random` (seeded N(0, initializer_range²), as a fresh Mixtral gate) or
    `uniform` (zeros: equal logits; with top_k below the number of experts, ties pick the experts).
    shared: attention, norms and embeddings from the `base` or the `average` of the inputs. Tensors
    are streamed one at a time. Inputs may also be PEFT LoRA adapters of the base (base + ΔW)."""
    start = time.perf_counter()
    mix = _Mixture(base, inputs, router=router, top_k=top_k, shared=shared, temperature=temperature, seed=seed)
    try:
        plan = mix.plan()
        stats = {
            "method": "mixtral", "router": router, "top_k": top_k, "shared": shared,
            **({"temperature": temperature} if router == "centroid" else {}), **({"seed": seed} if router == "random" else {}),
            "inputs": [str(p) for p in inputs], "experts": len(inputs), "layers": mix.llama.num_hidden_layers, "tensors": len(plan),
        }  # fmt: skip
        needed = sum(int(np.prod(shape)) * np.dtype(STORAGE[dtype]).itemsize for _, dtype, shape, _ in plan)
        with atomic_dir(Path(out), needed=needed) as tmp:
            writer = SafetensorsWriter(tmp / "model.safetensors", [(n, d, s) for n, d, s, _ in plan], metadata={"format": "pt"})
            try:
                for name, _, _, make in tqdm(plan, desc=f"exporting Mixtral ({len(inputs)} experts)", disable=not progress, leave=False):
                    writer.write(name, make())
            finally:
                writer.close()
            mixtral_config(mix.llama, len(inputs), top_k).save_pretrained(tmp)
            for f in mix.base.iterdir():  # tokenizer, generation config, chat template
                if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
                    shutil.copy2(f, tmp / f.name)
            stats["wall_s"] = round(time.perf_counter() - start, 3)
            files = file_hashes(tmp, {"model.safetensors": writer.digest})
            write_manifest(tmp, {"schema": 1, "kind": "model", "mix": stats, **(manifest or {}), "files": files})
    finally:
        mix.close()
    return stats


# --- Cairn's own model of the mixture -------------------------------------------------------


class MoeMLP(nn.Module):
    """A top-k mixture of silu-gated MLP experts: out = Σ_k w_k(x) · down_k(silu(gate_k x) ⊙ up_k x),
    w = topk_weights(router x). Cairn's model of a Mixtral sparse-MoE block, from the math alone."""

    def __init__(self, router, gate_proj, up_proj, down_proj, top_k: int):
        """router (E, hidden); gate_proj, up_proj (E, intermediate, hidden); down_proj (E, hidden, intermediate)."""
        super().__init__()
        self.top_k = top_k
        self.router = nn.Parameter(router)
        self.gate_proj, self.up_proj, self.down_proj = nn.Parameter(gate_proj), nn.Parameter(up_proj), nn.Parameter(down_proj)

    def forward(self, x):
        weights = topk_weights(F.linear(x, self.router).float(), self.top_k).to(x.dtype)
        out = torch.zeros_like(x)
        for k in range(self.router.shape[0]):
            h = F.silu(F.linear(x, self.gate_proj[k])) * F.linear(x, self.up_proj[k])
            out = out + weights[..., k : k + 1] * F.linear(h, self.down_proj[k])
        return out


def reference_model(
    base: str | Path,
    inputs: list[str | Path],
    *,
    router: str = "centroid",
    top_k: int = 2,
    shared: str = "base",
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
):
    """The mixture `export_mixtral` writes, as a float32 `LlamaForCausalLM` of `base` whose every
    layer's `mlp` is a `MoeMLP` (same tensors and router, values as the export stores them)."""
    from transformers import LlamaForCausalLM

    mix = _Mixture(base, inputs, router=router, top_k=top_k, shared=shared, temperature=temperature, seed=seed)
    try:
        model = LlamaForCausalLM.from_pretrained(str(mix.base), dtype=torch.float32)

        def tensor(array, dtype):
            return torch.from_numpy(np.array(stored(np.asarray(array, np.float32), dtype), np.float32))

        if shared == "average":
            state = {n: tensor(mix.shared_tensor(n), mix.base_w.meta(n)[0]) for n in mix.shared_names}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise ModelError(f"{mix.base}: tensors {unexpected[:3]} are not in LlamaForCausalLM")
        for i, layer in enumerate(model.model.layers):
            stack = {p: torch.stack([tensor(mix.expert_tensor(k, mix.mlp[i, p]), mix.base_w.meta(mix.mlp[i, p])[0]) for k in range(len(mix.sources))]) for p in _PROJECTIONS}
            gate = tensor(mix.gates[i], mix.gate_dtype())
            layer.mlp = MoeMLP(gate, stack["gate_proj"], stack["up_proj"], stack["down_proj"], top_k)
    finally:
        mix.close()
    return model.eval()
