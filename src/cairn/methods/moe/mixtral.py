"""Export full fine-tunes of one Llama-family base as a standard Mixtral MoE model (a HF folder).

Each fine-tune's MLP of layer i becomes expert k of layer i, in the Hub layout
`model.layers.{i}.block_sparse_moe.experts.{k}.w1/w2/w3.weight` (w1 = gate_proj, w2 = down_proj,
w3 = up_proj), with a router `model.layers.{i}.block_sparse_moe.gate.weight` (experts x hidden).
Attention, norms and embeddings come from the base or the inputs' mean. The folder loads with plain
transformers (`MixtralForCausalLM`); tests/methods/moe holds a model of the same mixture written
from the math alone, to check the export against.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cairn.errors import ModelError
from cairn.io import atomic_dir, read_json_object
from cairn.manifest import contribution_manifest, tasks_of
from cairn.methods.moe import statistics
from cairn.methods.moe.routing import centroid_router, random_router
from cairn.options import MIXTRAL_ROUTERS, MIXTRAL_SHARED, TEMPERATURE
from cairn.progress import bar as progress_bar
from cairn.weights.adapters import open_input
from cairn.weights.tensor_files import STORAGE, FolderWeights, SafetensorsWriter

DEFAULT_TEMPERATURE = TEMPERATURE["mixtral"]["centroid"]
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's names for Llama's
_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
# Weights, config and manifest are written anew; tokenizer files, generation config etc. are copied.
_NOT_COPIED = re.compile(r"(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|config\.json|cairn\.json|centroids\.safetensors)$")


# --- reading the inputs ---------------------------------------------------------------------


def _llama_config(base: Path):
    """The base's LlamaConfig; refuses models Mixtral cannot represent (other architectures,
    biased attention or MLP, a non-silu MLP)."""
    from transformers import LlamaConfig

    path = base / "config.json"
    raw = read_json_object(path, "a HF model's config", ModelError)
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
    stats = statistics.load(folder)
    out = np.empty((n_layers, hidden), np.float32)
    for i in range(n_layers):
        key = f"model.layers.{i}.mlp.mean"
        if key not in stats:
            raise ModelError(f"{folder / statistics.FILE}: no {key!r}; the centroid router needs every layer's MLP input mean")
        v = stats[key]
        if tuple(v.shape) != (hidden,):
            raise ModelError(f"{folder / statistics.FILE}: {key!r} has shape {list(v.shape)}, expected [{hidden}] (the hidden size)")
        out[i] = v.float().numpy()
    return out


class _Mixture:
    """The validated inputs of an export, and every output tensor computed from them on request."""

    def __init__(self, base, inputs, *, router, top_k, shared, temperature, seed):
        if not inputs:
            raise ModelError("nothing to export: give at least one fine-tuned model (one expert each)")
        if router not in MIXTRAL_ROUTERS:
            raise ModelError(f"unknown router {router!r}; expected one of {', '.join(MIXTRAL_ROUTERS)}")
        if shared not in MIXTRAL_SHARED:
            raise ModelError(f"unknown shared {shared!r}; expected one of {', '.join(MIXTRAL_SHARED)}")
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
    made_from: dict,
) -> dict:
    """Write to `out` (atomically) a Mixtral HF folder whose expert k is `inputs[k]`'s MLPs, all
    fine-tuned from the Llama folder `base`; return the export's statistics (the manifest's "mix").

    router: `centroid` (from each input's centroids.safetensors; see `centroid_router` for the
    scale `temperature`), `random` (seeded N(0, initializer_range²), as a fresh Mixtral gate) or
    `uniform` (zeros: equal logits; with top_k below the number of experts, ties pick the experts).
    shared: attention, norms and embeddings from the `base` or the `average` of the inputs. Tensors
    are streamed one at a time. Inputs may also be PEFT LoRA adapters of the base (base + ΔW).
    `made_from`: the manifest's provenance (`base`, `base_fingerprint`, ...)."""
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
                for name, _, _, make in progress_bar(plan, desc=f"exporting Mixtral ({len(inputs)} experts)", disable=not progress, leave=False):
                    writer.write(name, make())
            finally:
                writer.close()
            mixtral_config(mix.llama, len(inputs), top_k).save_pretrained(tmp)
            for f in mix.base.iterdir():  # tokenizer, generation config, chat template
                if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
                    shutil.copy2(f, tmp / f.name)
            stats["wall_s"] = round(time.perf_counter() - start, 3)
            contribution_manifest(tmp, "mix", stats, kind="model", task=tasks_of(inputs), method=f"mixtral-{router}", made_from=made_from, known={"model.safetensors": writer.digest})
    finally:
        mix.close()
    return stats
