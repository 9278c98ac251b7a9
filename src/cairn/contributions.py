"""The Contribution: what one party brings (a PEFT adapter or a fine-tuned HF folder, its routing
statistics and its `cairn.json` manifest, see `cairn.manifest`), and everything done with one.

- as an input: named as a folder or `store:ID`, and checked to have been made on the base it is
  combined with, before a merge or a mixture reads any weight;
- made: trained and saved in one rename by the main process, or reused where identical work
  saved one (`train_or_reuse`, the one protocol every strategy and command trains through);
- loaded: an adapter on its recorded base, a LoRA-MoE on its base (`load`).

A contribution with a manifest records its base's fingerprint, which must equal the base's. One
without (a plain PEFT adapter or HF folder from elsewhere) is accepted when its tensors fit the
base's shapes, with a note that its base could not be verified: an adapter trained on another
base of the same architecture fits too, and only a fingerprint tells them apart.
"""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cairn.distributed import barrier, is_main
from cairn.errors import ConfigError, ModelError
from cairn.io import atomic_dir
from cairn.manifest import contribution_manifest, describe, read_manifest
from cairn.models import ModelSpec, load_model, recorded_base, saved_bytes, write_model
from cairn.options import TrainConfig
from cairn.store import Store
from cairn.weights.adapters import adapter_config
from cairn.weights.tensor_files import FolderWeights, read_header

if TYPE_CHECKING:
    from cairn.training import TrainResult

# Naming and checking inputs imports no torch: `cairn merge` streams tensors with numpy alone, and
# torch's import would be ~4 s of a 5 s merge (bench/merge.py). What trains, computes routing
# statistics or loads a model imports torch's side (training, methods/moe, peft) where it is used.

log = logging.getLogger("cairn")
STORE_PREFIX = "store:"


def resolve_inputs(items: list[str | Path], store_dir: Path | str, base_fingerprint: Callable[[], str]) -> list[Path]:
    """The folders of `items`: each a folder, or `store:ID` (verified, and checked against the base's
    fingerprint). A bare name that is both a folder and a store ID is refused rather than guessed."""
    store = Store(store_dir)
    stored = None
    paths = []
    for item in map(str, items):
        if item.startswith(STORE_PREFIX):
            cid = item.removeprefix(STORE_PREFIX)
            paths.append(store.resolve(cid, base_fingerprint=base_fingerprint()))
            continue
        if stored is None:
            stored = {e["id"] for e in store.list()} if (Path(store_dir) / "index.json").is_file() else set()
        if Path(item).exists() and item in stored:
            raise ConfigError(
                f"input {item!r} is both a folder (./{item}) and a contribution in the store {store_dir}; "
                f"write ./{item} for the folder or {STORE_PREFIX}{item} for the stored one"
            )
        if item in stored:
            paths.append(store.resolve(item, base_fingerprint=base_fingerprint()))
        elif Path(item).exists():
            paths.append(Path(item))
        else:
            raise ConfigError(f"input {item!r} is neither a folder nor a contribution in the store {store_dir} (`cairn store list` shows what is there)")
    return paths


def check_inputs(inputs: list[Path], base_folder: str | Path, base_fingerprint: Callable[[], str], base_name: str) -> None:
    """Refuse an input made on another base (its manifest's fingerprint differs) or of another
    architecture (its tensors do not fit the base's shapes), naming it; note the inputs whose base
    cannot be verified. Reads only manifests and safetensors headers."""
    shapes = _shapes(base_folder)
    for path in map(Path, inputs):
        if not path.is_dir():
            raise ModelError(f"{path}: no such folder (a PEFT adapter folder or a HF model folder was expected)")
        _check_shapes(path, shapes, base_name)
        recorded = (read_manifest(path) or {}).get("base_fingerprint")
        if recorded is None:
            log.warning(f"{path}: no Cairn manifest with its base's fingerprint; its shapes fit {base_name}, but its base could not be verified")
        elif recorded != base_fingerprint():
            raise ModelError(
                f"{path} was made on a base with fingerprint {str(recorded)[:12]}, not on {base_name} ({base_fingerprint()[:12]}); "
                "combine contributions of one base only"
            )


def _shapes(base_folder: str | Path) -> dict[str, list[int]]:
    """The shape of every tensor of a base folder, from its safetensors headers."""
    weights = FolderWeights(base_folder)
    try:
        return {name: weights.meta(name)[1] for name in weights.keys()}
    finally:
        weights.close()


_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _check_shapes(path: Path, shapes: dict[str, list[int]], base_name: str) -> None:
    if not (path / "adapter_config.json").is_file():
        weights = FolderWeights(path)
        try:
            theirs = {name: weights.meta(name)[1] for name in weights.keys()}
        finally:
            weights.close()
        for name, shape in theirs.items():
            if shapes.get(name) != shape:
                mine = f"has {shapes[name]}" if name in shapes else "has no such tensor"
                raise ModelError(f"{path}: tensor {name!r} has shape {shape}, {base_name} {mine}: it was made from another architecture")
        return
    transposed = bool(adapter_config(path).get("fan_in_fan_out"))
    header, _ = read_header(path / "adapter_model.safetensors")
    for key, entry in header.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            continue  # read_lora names what it cannot combine
        weight = f"{m.group(1)}.weight"
        if weight not in shapes:
            raise ModelError(f"{path}: adapts module {m.group(1)!r}, which {base_name} does not have: it was made for another architecture")
        out_dim, in_dim = shapes[weight][::-1] if transposed else shapes[weight]
        shape = entry.get("shape") or []
        fits = len(shape) == 2 and (shape[1] == in_dim if m.group(2) == "A" else shape[0] == out_dim)
        if not fits:
            raise ModelError(
                f"{path}: {key} has shape {shape}, which does not fit {base_name}'s {m.group(1)} ({shapes[weight][0]} x {shapes[weight][1]}): "
                "it was made for another architecture"
            )


def describe_made_elsewhere(path: Path, base: str, base_folder: str | Path, base_fingerprint: str, *, task: str | None = None) -> dict:
    """The manifest of a contribution made without Cairn (a PEFT LoRA adapter or a HF model folder,
    no cairn.json) on `base`, as its owner names it: checked to fit the base's shapes (only the
    owner's word says it was made on this base, and the manifest records whose word it is), task
    `task` (default: the folder's name). Written nowhere: `cairn store add --base` puts it in the
    store's copy, leaving the owner's folder as it is."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such folder (a PEFT adapter folder or a HF model folder was expected)")
    if read_manifest(path) is not None:
        raise ConfigError(f"{path} has a Cairn manifest, which names its base; add it without --base")
    adapter = (path / "adapter_config.json").is_file()
    if adapter and str(adapter_config(path).get("peft_type", "LORA")).upper() != "LORA":
        raise ModelError(f"{path}: a {adapter_config(path)['peft_type']} adapter; Cairn combines LoRA adapters only (adapter_config.json 'peft_type': LORA)")
    if not adapter and not (path / "config.json").is_file():
        raise ModelError(f"{path} is neither a PEFT adapter folder (adapter_config.json) nor a HF model folder (config.json)")
    _check_shapes(path, _shapes(base_folder), base)
    named = adapter_config(path).get("base_model_name_or_path") if adapter else None
    details = {"from": str(path.resolve()), "base_named_by": "--base", **({"adapter_config_base": named} if named else {})}
    made_from = {"base": recorded_base(base), "base_fingerprint": base_fingerprint}
    return describe(path, "import", details, kind="adapter" if adapter else "model", task=task or path.resolve().name,
                    method="lora" if adapter else "fft", made_from=made_from)  # fmt: skip


# --- making one: train, or reuse what identical work saved -------------------------------------


def save_contribution(result: TrainResult, tokenizer, task, cfg: TrainConfig, out, *, base: str, base_fingerprint: str) -> dict:
    """Write a trained model (PEFT adapter for LoRA, HF folder for FFT), its routing statistics and
    its manifest into a temporary folder that becomes `out` in one rename: a killed save leaves no
    `out` that a later command could take for a whole contribution."""
    out, base = Path(out), recorded_base(base)
    with atomic_dir(out, needed=saved_bytes(result.model)) as tmp:
        write_model(result.model, tokenizer, tmp, base=base)
        save_routing_statistics(result.model, tokenizer, task, cfg, tmp)
        trained = {
            "examples": len(task.train),
            "losses": result.losses,
            "tokens": result.tokens,
            "steps": result.steps,
            "wall_s": round(result.wall_s, 3),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "peak_mem_mb": round(result.peak_mem_mb, 1),
            "state_mb": round(result.state_mb, 1),  # this process's share of weights, gradients and optimizer states (sharded: its shards)
            "trainable_params": result.trainable_params,
            "bf16": result.bf16,
            **({"extra_losses": result.extra_losses} if result.extra_losses else {}),  # a regulariser's share of each step's loss
        }
        made_from = {"base": base, "base_fingerprint": base_fingerprint}
        return contribution_manifest(tmp, "train", trained, kind="adapter" if cfg.method == "lora" else "model", task=task.name, method=cfg.method,
                                     made_from=made_from, metric=task.metric, data_hash=task.data_hash(), hyperparameters=cfg.model_dump())  # fmt: skip


def save_routing_statistics(model, tokenizer, task, cfg: TrainConfig, out: Path) -> None:
    """Ship the contribution's routing statistics (methods/moe/statistics.py) over the task's training
    prompts, so a mixer can route to it later without the data: per adapted module as the base
    model reads the prompts for LoRA (the LoRA-MoE router reads prompts so), per MLP block of
    the fine-tuned model for FFT (the Mixtral router sits inside it). Prompts are cut to
    `max_length` tokens, as training cuts them (a 50 MB prompt read whole took 21 GB)."""
    from cairn.methods.moe import statistics

    if cfg.method == "lora":
        inner = model.get_base_model()
        modules = sorted(name for name, m in inner.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    else:
        modules = statistics.mlp_modules(model)
    prompts = [ex.prompt for ex in task.train]
    with model.disable_adapter() if cfg.method == "lora" else nullcontext():
        stats = statistics.input_statistics(model, tokenizer, prompts, modules, max_length=cfg.max_length)
    statistics.save(stats, out, len(prompts))


def train_and_save(out: Path, run: Callable[[], TrainResult], tokenizer, task, cfg: TrainConfig, *, base: str, base_fingerprint: str) -> TrainResult:
    """`run()` (the training) on every process; the main one saves its result as the contribution
    `out`; every process returns once it is saved (under `accelerate launch`, every process trains
    its share and then reads what the main one wrote)."""
    result = run()
    if is_main():
        save_contribution(result, tokenizer, task, cfg, out, base=base, base_fingerprint=base_fingerprint)
    barrier()
    return result


def train_or_reuse(folder: Path, run: Callable[[], TrainResult], tokenizer, task, cfg: TrainConfig, *, base: str, base_fingerprint: str) -> TrainResult | None:
    """`train_and_save` into `folder` unless it already holds a contribution (identical work, done
    before: `folder` is named after what it was made from), in which case None: load it."""
    barrier()  # every process sees the same folder: all train, or none
    if read_manifest(folder) is not None:
        return None
    return train_and_save(folder, run, tokenizer, task, cfg, base=base, base_fingerprint=base_fingerprint)


def train_contribution(
    base: str, task, cfg: TrainConfig, out, *, progress: bool = True, checkpoint_dir: Path | str | None = None, checkpoint_every: int | None = None
) -> dict:
    """Train on `task` from `base` and save the contribution at `out` with its `cairn.json` manifest.

    With `checkpoint_dir`, training checkpoints there every `checkpoint_every` steps (in a subfolder
    per base model) and resumes from it when it holds this run's checkpoint; the folder is removed
    once the contribution is saved. Under `accelerate launch` every process trains and the main one
    writes; all return the manifest.
    """
    from cairn.training import train

    model, tokenizer = load_model(base)
    base_fp = model.cairn_fingerprint
    checkpoints = Path(checkpoint_dir) / base_fp[:20] if checkpoint_dir is not None else None

    def run() -> TrainResult:
        return train(model, tokenizer, task.train, cfg, progress=progress, desc=f"{cfg.method} on {task.name}", checkpoint_dir=checkpoints, checkpoint_every=checkpoint_every)

    train_and_save(Path(out), run, tokenizer, task, cfg, base=str(base), base_fingerprint=base_fp)
    if checkpoint_dir is not None and is_main():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return read_manifest(out)


# --- loading one ------------------------------------------------------------------------------------


def load(spec: str | ModelSpec, *, base: str | None = None, allow_pickle: bool = False):
    """Load `(model, tokenizer)` for any model spec: a base, or a PEFT adapter or a LoRA-MoE on top
    of its recorded base, or on `base` where given (`--base`: another copy of it, or the base of an
    adapter that records none); an adapter's recorded fingerprint must be its base's.

    A local folder is checked first (`check_folder`), so that corrupt weights or an absurd
    config.json are a one-line ModelError before anything is allocated.
    The returned model carries `cairn_base` (the base spec string) and `cairn_fingerprint`.
    """
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if spec.kind not in ("adapter", "moe"):
        if base is not None:
            raise ConfigError(f"--base {base}: {spec} is a whole model, not an adapter or a mixture; --base names the base an adapter is loaded on")
        return load_model(spec, allow_pickle=allow_pickle)
    path = Path(spec.value)
    named, origin = (base, "--base") if base is not None else recorded_base_of(path)
    try:
        model, tokenizer = load_model(named, allow_pickle=allow_pickle)
    except ModelError as exc:
        override = "give another spec with --base" if base is not None else "give the base with --base SPEC (a folder, bundled:NAME or a hub id)"
        raise ModelError(f"{path}: {origin} names the base {named!r}, which cannot be loaded: {exc}; {override}") from exc
    manifest = read_manifest(path)
    if manifest and manifest.get("base_fingerprint") not in (None, model.cairn_fingerprint):
        raise ModelError(
            f"{path} was made on a base with fingerprint {manifest['base_fingerprint'][:12]}, but {named} ({origin}) has "
            f"{model.cairn_fingerprint[:12]}; give the base it was made on with --base"
        )
    base_name, fp = model.cairn_base, model.cairn_fingerprint
    model = _attach_moe(path, model) if spec.kind == "moe" else _attach_adapter(path, model, allow_pickle=allow_pickle)
    model.eval()
    model.cairn_base, model.cairn_fingerprint = base_name, fp
    return model, tokenizer


def _attach_adapter(path: Path, model, *, allow_pickle: bool):
    from peft import PeftModel

    pickled_ok = allow_pickle and (path / "adapter_model.bin").is_file()
    if not (path / "adapter_model.safetensors").is_file() and not pickled_ok:
        raise ModelError(f"{path}: adapter_model.safetensors not found (pickled adapters need --allow-pickle)")
    return PeftModel.from_pretrained(model, str(path))


def _attach_moe(path: Path, model):
    from cairn.methods.moe.lora_moe import load_moe

    return load_moe(path, model)


def recorded_base_of(path: Path) -> tuple[str, str]:
    """(the base spec an adapter or LoRA-MoE folder records, where it is recorded): its Cairn
    manifest's, else a LoRA-MoE's moe.json or an adapter's adapter_config.json."""
    manifest = read_manifest(path)
    if manifest and manifest.get("base"):
        return str(manifest["base"]), "its cairn.json"
    if (path / "moe.json").is_file():
        from cairn.methods.moe.lora_moe import moe_base

        return moe_base(path), "its moe.json"
    base = adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}: no base model recorded (cairn.json 'base' or adapter_config.json 'base_model_name_or_path'); give it with --base SPEC")
    return str(base), "its adapter_config.json"
