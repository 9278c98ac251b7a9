"""The `osf` strategy: PEFT's orthogonal subspace fine-tuning (`OSFConfig`, Nayak et al., "Sculpting
Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning", 2025) in its sequential
recipe: used from PEFT, not rewritten; semi-collaborative.

At stage s every targeted linear weight is split by SVD; its top `effective_rank` singular
directions (a fraction of min(out, in)) stay frozen and the rest is trained, with PEFT's hooks
projecting the gradients off the frozen directions. After the stage the update is merged into the
weights (`merge_and_unload`) and the next stage decomposes the updated weights again with a larger
preserved fraction, so what earlier stages learned moves into the frozen part: stage s preserves
`effective_rank` + (s − 1) · `rank_step`, at most `max_rank` (PEFT's example runs 0.3, 0.5, 0.7
over three tasks, the defaults here; it calls `unload()` between tasks, which
drops OSF's update (tests/strategies/test_osf.py shows it with PEFT 0.21), so this merges). Full fine-tuning of a subspace:
`train: {method: fft}` (learning rate, epochs, target_modules as for FFT); each stage is saved
as a full model folder."""

from __future__ import annotations

from typing import Iterator

from transformers import AutoModelForCausalLM

from cairn.errors import ConfigError
from cairn.models import fingerprint
from cairn.options import OSFOptions, TrainConfig
from cairn.speedups import uses_bf16
from cairn.training import TrainResult, train
from cairn.workspace import Workspace

TRAINED = "osf_svd_params"  # PEFT's trainable OSF parameters: the low singular factors


def preserved(opts: OSFOptions, stage: int) -> float:
    """The fraction of each targeted weight's singular directions stage `stage` (1-based) keeps frozen."""
    return round(min(opts.effective_rank + (stage - 1) * opts.rank_step, opts.max_rank), 6)


def run(model, stream, opts: OSFOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    if cfg.method != "fft":
        raise ConfigError(f"strategy kind osf fine-tunes full weight subspaces, got train method {cfg.method!r}; use method: fft")
    return _stages(model, stream, opts, cfg, work)


def _stages(model, stream, opts: OSFOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    from peft import OSFConfig, get_peft_model

    for s, task in enumerate(stream, 1):
        own, rank = work.config_for(task, cfg), preserved(opts, s)
        start = fingerprint(model)
        folder = work.folder("osf", start, task.data_hash(), own.model_dump(), rank, uses_bf16(own))

        def fit() -> TrainResult:
            wrapped = get_peft_model(model, OSFConfig(target_modules=own.target_modules, effective_rank=rank))
            result = train(wrapped, work.tokenizer, task.train, own, trainable=lambda name: TRAINED in name, progress=work.progress,
                           desc=f"osf on {task.name}", checkpoint_dir=work.checkpoints(folder))  # fmt: skip
            result.model = wrapped.merge_and_unload().eval()
            return result

        result = work.trained(folder, task, own, fit, start)
        model = result.model if result is not None else AutoModelForCausalLM.from_pretrained(folder).eval()
        work.note(osf_effective_rank=rank)
        yield model
