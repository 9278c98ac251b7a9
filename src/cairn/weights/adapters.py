"""Reading PEFT LoRA adapters as tensors, and an adapter or HF folder as one merge/MoE input.

Used by merging (an adapter enters as the full model it stands for, base + scale · B·A) and by
the LoRA-MoE (which applies each expert's A and B low-rank) alike.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cairn.errors import ModelError
from cairn.io import read_json_object
from cairn.weights.tensor_files import FolderWeights, SafetensorsReader, stored


def adapter_config(folder: Path) -> dict:
    """A PEFT adapter folder's adapter_config.json."""
    return read_json_object(Path(folder) / "adapter_config.json", "a PEFT adapter config", ModelError)


def read_lora(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, float, bool]]:
    """module -> (A, B, scale, fan_in_fan_out) of a PEFT LoRA adapter folder, float32; the module's
    delta is scale · B·A (transposed when fan_in_fan_out)."""
    folder = Path(folder)
    config = adapter_config(folder)
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ModelError(f"{folder}: only plain LoRA adapters can be combined (peft_type {config.get('peft_type')}, use_dora {config.get('use_dora')})")
    try:
        reader = SafetensorsReader(folder / "adapter_model.safetensors")
        state = {k: np.array(reader.get(k), np.float32) for k in reader.keys()}
        reader.close()
    except OSError as exc:
        raise ModelError(f"{folder}/adapter_model.safetensors: cannot read ({exc})") from exc
    pattern = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        m = pattern.fullmatch(key)
        if not m:
            raise ModelError(f"{folder}: adapter tensor {key!r} is not a LoRA A/B matrix; only lora_A/lora_B weights can be combined")
        halves.setdefault(m.group(1), {})[m.group(2)] = tensor
    out = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{folder}: module {module!r} lacks lora_A or lora_B")
        rank = ab["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        out[module] = (ab["A"], ab["B"], scale, bool(config.get("fan_in_fan_out")))
    return out


class AdapterWeights:
    """A PEFT LoRA adapter seen as the full model base + ΔW on each adapted module."""

    def __init__(self, folder: str | Path, base: FolderWeights):
        self.folder, self.base = Path(folder), base
        self.deltas = {f"{m}.weight": v for m, v in read_lora(self.folder).items()}  # name -> A, B, scale, fan_in_fan_out
        for name in self.deltas:
            if name not in base.where:
                raise ModelError(f"{self.folder}: module {name.removesuffix('.weight')!r} is not in the base model")

    def delta(self, name: str) -> np.ndarray | None:
        if name not in self.deltas:
            return None
        a, b, scale, transposed = self.deltas[name]
        d = (b @ a) * np.float32(scale)
        return d.T if transposed else d

    def get(self, name: str) -> np.ndarray:
        """The parameter of the model base + ΔW, rounded to the base's dtype as a saved merge would be."""
        base = self.base.get(name)
        d = self.delta(name)
        return base if d is None else stored(base.astype(np.float32) + d, self.base.meta(name)[0])

    def release(self, name: str) -> None:
        pass  # the base's pages are released by the base reader

    def close(self) -> None:
        pass


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def open_input(path: str | Path, base: FolderWeights):
    """An input model: an adapter folder (adapter_config.json) or a full HF folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such folder (a HF model folder or a PEFT adapter folder was expected)")
    if (path / "adapter_config.json").is_file():
        return AdapterWeights(path, base)
    weights = FolderWeights(path)
    missing = [n for n in base.keys() if n not in weights.where]
    extra = [n for n in weights.keys() if n not in base.where]
    if missing or extra:
        raise ModelError(f"{path}: tensors differ from the base model's (missing {missing[:3]}, extra {extra[:3]}); was it made from this base?")
    for n in base.keys():
        if weights.meta(n)[1] != base.meta(n)[1]:
            raise ModelError(f"{path}: tensor {n!r} has shape {weights.meta(n)[1]}, the base has {base.meta(n)[1]}")
    return weights
