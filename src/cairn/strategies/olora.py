"""The `olora` strategy: a new LoRA adapter per task, kept orthogonal to the earlier ones
(methods/olora.py); each stage is stored as one stacked adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from peft import PeftModel

from cairn.errors import ConfigError
from cairn.manifest import read_manifest
from cairn.methods.olora import NEW, PREV, penalty, penalty_ratio, stack_stages, stage_model
from cairn.models import fingerprint
from cairn.options import OLoRAOptions, TrainConfig
from cairn.speedups import uses_bf16
from cairn.training import TrainResult, train
from cairn.workspace import Workspace


def run(model, stream, opts: OLoRAOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """A new LoRA adapter per task, trained orthogonal to the frozen earlier ones; yields the base
    with all stages' adapters stacked into one. LoRA only (an experiment config that says otherwise
    is refused when it is read; this guards a direct call)."""
    if cfg.method != "lora":
        raise ConfigError(f"strategy kind olora trains LoRA adapters only, got train method {cfg.method!r}; use method: lora")
    return _stages(model, stream, opts, cfg, work)


def _stages(base, stream, opts: OLoRAOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    base_fp = fingerprint(base)
    prev: Path | None = None
    model = None
    for s, task in enumerate(stream, 1):
        if model is not None:  # the previous stage's model has been evaluated: reuse its base
            base = model.unload()
        if prev is None and not opts.lambda2:  # no term applies yet: stage 1 is the task's plain LoRA contribution, shared through the cache
            prev = work.contribution(base, task, cfg)
            model = PeftModel.from_pretrained(base, str(prev)).eval()
            yield model
            continue
        folder = work.folder("olora", prev.name if prev else base_fp, task.data_hash(), cfg.model_dump(), opts.model_dump(), uses_bf16(cfg))

        def run() -> TrainResult:
            staged = stage_model(base, prev, cfg, cfg.seed + s)
            result = train(
                staged,
                work.tokenizer,
                task.train,
                cfg,
                extra_loss=penalty(staged, opts),
                trainable=lambda name: f".{NEW}." in name,  # earlier stages stay frozen
                progress=work.progress,
                desc=f"olora on {task.name}",
                checkpoint_dir=work.checkpoints(folder),
            )
            result.model = stack_stages(result.model, [PREV, NEW] if prev else [NEW])
            return result

        result = work.trained(folder, task, cfg, run, base_fp)
        model = result.model if result is not None else PeftModel.from_pretrained(base, str(folder)).eval()
        trained = read_manifest(folder)["train"]  # trained now or earlier: the stage row reads the same
        if trained.get("extra_losses"):
            work.note(penalty_ratio=penalty_ratio(trained["extra_losses"], trained["losses"]))
        prev = folder
        yield model
