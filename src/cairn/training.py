"""One training loop for full fine-tuning (FFT) and LoRA, with answer-only loss.

Built on accelerate: under `accelerate launch` (data parallel, DDP on GPUs or gloo on CPUs) every
process draws the same global batches and trains on its rows of each, so N processes follow the
loss curve of one (tests/distributed); `batch_size` is the global batch. Extra loss
terms (regularisers of later methods) plug in through `extra_loss(model) -> tensor`. Given a
checkpoint folder, the loop checkpoints itself every few optimizer steps and resumes from the
folder's checkpoint (see `cairn.checkpoints`); a NaN or infinite loss stops it with
`TrainingDiverged`, before the bad step touches the weights or the checkpoint.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import psutil
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from cairn.checkpoints import Checkpoints, Resume, run_identity, set_rng_states
from cairn.data.batching import IGNORE, encode, length_grouped_loader
from cairn.data.task import Example
from cairn.errors import ConfigError, DataError, TrainingDiverged
from cairn.fused_lora import fused_lora
from cairn.models import causal_lm_of
from cairn.validation import Strict

DEFAULT_LR = {"lora": 1e-3, "fft": 2e-5}
# Optimizer steps between checkpoints. For the 135M model on 2 CPU cores a LoRA checkpoint is ~56 MB
# (0.1 s to write, against ~1 s a step); an FFT one ~1.5 GB (weights and two AdamW moments, 4-6 s),
# so every 100 steps (~2.5 min) keeps its cost near 3%.
DEFAULT_CHECKPOINT_EVERY = {"lora": 20, "fft": 100}
# Longest example (tokens) trained with eager attention. On CPU, SDPA's backward is slow on short
# sequences: eager attention trains the bundled model 1.04x-1.3x faster up to 512 tokens
# (bench/train.py); beyond that its L x L scores cost more memory than they save time.
EAGER_ATTENTION_UP_TO = 512


class TrainConfig(Strict):
    """Hyper-parameters of one training run; unknown keys are errors."""

    method: Literal["lora", "fft"] = "lora"
    epochs: int = Field(8, ge=1)
    lr: float | None = Field(None, gt=0, description="default: 1e-3 for LoRA, 2e-5 for FFT")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: 2 * lora_r")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    max_length: int = Field(1024, ge=8)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seed range
    bf16: bool | Literal["auto"] = "auto"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class TrainResult:
    model: object
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    # The training's own peak memory: the largest increase of the process's resident memory over
    # its value when the training started, sampled at every optimizer step (train() says how).
    peak_mem_mb: float = 0.0
    trainable_params: int = 0
    bf16: bool = False


def reuse_freed_memory() -> bool:
    """Let glibc's malloc hand freed memory back to the next allocation rather than to the OS.

    A training step frees and reallocates hundreds of MB of activations and gradients. By default
    glibc returns much of it to the OS (tensors above its adaptive mmap threshold, and the heap's
    top beyond 128 KB), so the next step faults it back in page by page: 4-5 M page faults in
    bench/train.py's FFT run. With tensors up to 32 MB (glibc's limit) taken from the heap and up to
    1 GB of free heap kept, FFT trains 5-8% faster for ~0.2 GB more peak memory. Process-wide and
    idempotent; returns False where the C library is not glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def bf16_supported() -> bool:
    """True on a CUDA device with bf16, or a CPU with native bf16 instructions (AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lora_config(cfg: TrainConfig, model=None):
    """The PEFT `LoraConfig` of a fresh adapter as configured; given the `model` it will adapt,
    its rank is first checked against the layers it targets (`check_lora_rank`)."""
    from peft import LoraConfig

    if model is not None:
        check_lora_rank(model, cfg)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def check_lora_rank(model, cfg: TrainConfig) -> None:
    """Refuse, before anything is allocated, a rank above min(in, out) of a targeted layer (its
    factors could not be of lower rank than the layer itself: 1e6 allocated until killed), and
    target modules that match no linear layer."""
    from torch import nn

    causal_lm = causal_lm_of(model)
    output = causal_lm.get_output_embeddings()
    linear = {  # a layer PEFT already wraps is its `base_layer`; the LoRA factors are not targets
        name.removesuffix(".base_layer"): m
        for name, m in causal_lm.named_modules()
        if isinstance(m, nn.Linear) and m is not output and ".lora_" not in name
    }
    if cfg.target_modules == "all-linear":
        targeted = linear
    else:
        targeted = {name: m for name, m in linear.items() if name.rsplit(".", 1)[-1] in cfg.target_modules or name in cfg.target_modules}
    if not targeted:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ConfigError(f"target_modules {cfg.target_modules}: no linear layer of the model has that name; its linear layers: {', '.join(names)}")
    name, smallest = min(targeted.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    limit = min(smallest.in_features, smallest.out_features)
    if cfg.lora_r > limit:
        raise ConfigError(
            f"lora_r {cfg.lora_r} is above the rank of the layer {name} ({smallest.out_features} x {smallest.in_features}); "
            f"use lora_r <= {limit}, or leave that layer out of target_modules"
        )


def add_lora(model, cfg: TrainConfig):
    """Wrap `model` with a fresh PEFT LoRA adapter as configured."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, model))


@contextmanager
def frozen_in_bf16(model, enabled: bool):
    """Hold the frozen weights of linear layers in bfloat16 while training, restoring the originals after.

    Autocast re-casts a frozen weight at every use (it caches only leaves that require grad), so
    casting them once gives the same numbers for less memory traffic. Embeddings stay as they are:
    the residual stream keeps autocast's float32. An output layer tied to a frozen embedding gets a
    bfloat16 copy of it for the while (the vocabulary-sized cast is a few percent of a LoRA step).
    """
    from torch import nn

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    frozen = {
        id(m.weight): m.weight
        for m in model.modules()
        if enabled and isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32 and id(m.weight) not in embeddings
    }
    originals = [(p, p.data) for p in frozen.values()]
    for p, data in originals:
        p.data = data.to(torch.bfloat16)
    causal_lm = causal_lm_of(model)
    output = causal_lm.get_output_embeddings()
    weight = getattr(output, "weight", None)
    tied = weight if enabled and id(weight) in embeddings and not weight.requires_grad and weight.dtype == torch.float32 else None
    if tied is not None:
        output.weight = nn.Parameter(tied.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for p, data in originals:
            p.data = data
        if tied is not None:
            output.weight = tied


@contextmanager
def sparse_tied_lookup(model):
    """Give a trained embedding tied to the output layer a sparse lookup gradient while training.

    The lookup touches only the batch's tokens, but its default gradient is a dense zero-filled
    vocabulary-sized matrix (113 MB for the bundled model) added to the output layer's dense one.
    Sparse, it is added into the output layer's gradient in place, so the parameter's gradient is
    still dense (fused AdamW needs that): +4-6% an FFT step. Untied or frozen embeddings are left.
    """
    from torch import nn

    causal_lm = causal_lm_of(model)
    lookup, output = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    switch = isinstance(lookup, nn.Embedding) and not lookup.sparse and lookup.weight.requires_grad and getattr(output, "weight", None) is lookup.weight
    if switch:
        lookup.sparse = True
    try:
        yield
    finally:
        if switch:
            lookup.sparse = False


@contextmanager
def attention_for(model, longest: int):
    """Eager attention while training on examples of at most `EAGER_ATTENTION_UP_TO` tokens (the
    model's own choice, usually SDPA, otherwise), restored after."""
    causal_lm = causal_lm_of(model)
    before = getattr(causal_lm.config, "_attn_implementation", None)
    switch = longest <= EAGER_ATTENTION_UP_TO and before not in (None, "eager") and hasattr(causal_lm, "set_attn_implementation")
    if switch:
        causal_lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            causal_lm.set_attn_implementation(before)


class AnswerLoss(torch.nn.Module):
    """The causal LM whose forward returns (summed cross-entropy over answer tokens, their count).

    Only the answer positions go through the output layer, which skips most of the
    vocabulary-sized matmul (prompts are most of the tokens). Being a module, it is what
    `accelerator.prepare` wraps, so DDP sees the forward pass it hooks its gradient sync into.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        causal_lm = causal_lm_of(self.model)
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def clipped_step(accelerator, optimizer, params: list[torch.Tensor], max_norm: float | None) -> None:
    """One optimizer step on gradients clipped to total norm `max_norm` (None: unclipped).

    A fused AdamW divides the gradients by its `grad_scale` as it reads them (the hook GradScaler
    unscales through), so there clipping is one read of the gradients for their norm instead of a
    read and a scaling pass: about 1 GB of memory traffic a step for a full 135M-parameter model.
    Anything else clips as accelerate does.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    fused = all(group.get("fused") for group in inner.param_groups) and getattr(accelerator, "scaler", None) is None
    if max_norm and not fused:
        accelerator.clip_grad_norm_(params, max_norm)
    elif max_norm:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        inner.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # 1 / torch's clip coefficient
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("grad_scale", None)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the batch's answer tokens, and their count."""
    total, count = AnswerLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return total / max(count, 1), count


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of `batch` the loss is over (answer tokens after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Process `rank`'s rows of a global batch (every `world`-th row), cut to their own longest.

    Every process draws the same global batches from the seeded loader and trains on its rows, so
    N processes see exactly the batches one process would. A process left without a row (a last
    batch smaller than N) gets a row without labels: it joins the gradient sync, adding nothing.
    """
    if world == 1:
        return batch
    rows = {k: v[rank::world] for k, v in batch.items()}
    if len(rows["input_ids"]) == 0:
        rows = {k: v[:1] for k, v in batch.items()}
        rows["labels"] = torch.full_like(rows["labels"], IGNORE)
    width = int(rows["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in rows.items()}


def _batches(loader, order: torch.Generator, epochs: int, resume: Resume | None) -> Iterator[tuple[int, int, torch.Tensor, dict]]:
    """(epoch, index in the epoch, the order generator's state when the epoch began, batch) for
    every batch left to train.

    The sampler draws an epoch's order from `order` when the epoch starts, so resuming sets that
    state back, replays the interrupted epoch's order and skips the batches already trained, then
    restores the checkpoint's RNG states (starting an epoch also draws from torch's RNG).
    """
    for epoch in range(resume.epoch if resume else 0, epochs):
        resuming = resume is not None and epoch == resume.epoch
        if resuming:
            order.set_state(resume.order)
        order_state = order.get_state()
        batches = enumerate(loader)
        if resuming:
            for _ in range(resume.batch):
                next(batches)
            set_rng_states(resume.rng)
        for index, batch in batches:
            yield epoch, index, order_state, batch


PROGRESS = ("steps", "tokens", "losses", "wall_s", "peak_mem_mb")  # the TrainResult fields a checkpoint keeps


def _diverged(desc: str, loss: float, step: int, total: int, epoch: int, cfg: TrainConfig, checkpoints: Checkpoints | None) -> TrainingDiverged:
    kept = checkpoints.latest_step() if checkpoints else None
    where = f"the last good checkpoint (step {kept}) is kept in {checkpoints.folder}" if kept else "no checkpoint was written before it"
    return TrainingDiverged(
        f"{desc}: training diverged: loss {loss} at step {step} of {total} (epoch {epoch + 1} of {cfg.epochs}); {where}. "
        f"A lower learning rate (now {cfg.learning_rate:g}) may help"
    )


def train(
    model,
    tokenizer,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    extra_loss: Callable[[object], torch.Tensor] | None = None,
    trainable: Callable[[str], bool] | None = None,
    progress: bool = True,
    desc: str = "training",
    checkpoint_dir: Path | str | None = None,
    checkpoint_every: int | None = None,
) -> TrainResult:
    """Train `model` on `examples` (LoRA wraps it in a new adapter) and return it with its statistics.

    `trainable(name)` picks the parameters to train; by default every weight for FFT and every LoRA
    weight for LoRA (so a model that already has adapters continues training them).

    With `checkpoint_dir` (a folder for this run only: the start model is not checked), a
    checkpoint is written there every `checkpoint_every` optimizer steps (default
    `DEFAULT_CHECKPOINT_EVERY[cfg.method]`), and a checkpoint found there from the same config, data
    and trainable parameters is resumed, giving the same result as an uninterrupted run. A NaN or
    infinite loss raises `TrainingDiverged` before that step changes anything; the checkpoint on
    disk, written after a finite step, is kept.
    """
    import ctypes
    import gc

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    if not examples:
        raise DataError("no training examples")
    set_seed(cfg.seed)
    # Memory is counted from here, once earlier work's garbage is collected and the free heap it left
    # is handed back to the OS: what an earlier training freed would otherwise be reused unseen, so a
    # strategy's peak would depend on what ran before it in the process.
    gc.collect()
    if reuse_freed_memory():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    process = psutil.Process()
    start_mb = process.memory_info().rss / 2**20
    use_bf16 = bf16_supported() if cfg.bf16 == "auto" else cfg.bf16
    # Precision is chosen per run with torch.autocast rather than Accelerator(mixed_precision=...),
    # which is fixed once per process; under `accelerate launch` the user's config still applies.
    # Gradient accumulation is counted here, per epoch (an epoch's last batch always steps):
    # accelerate's own counting needs a prepared data loader, and this loop shards batches itself.
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    _check_distribution(accelerator, cfg)
    if cfg.method == "lora" and not hasattr(model, "peft_config"):
        model = add_lora(model, cfg)
    trainable = trainable or (lambda name: cfg.method == "fft" or "lora_" in name)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=accelerator.device.type in ("cpu", "cuda"))
    features = [encode(ex, tokenizer, cfg.max_length) for ex in examples]
    loader = length_grouped_loader(features, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
    order = loader.sampler.generator
    total = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total),
        num_training_steps=total,
    )
    # The loader stays unprepared: each process draws every global batch and keeps its `shard`. So
    # does the scheduler: prepared, it would step once per process at every optimizer step.
    loss_of, optimizer = accelerator.prepare(AnswerLoss(model), optimizer)
    autocast = lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    longest = max(len(f["input_ids"]) for f in features)
    result = TrainResult(model=None, trainable_params=sum(p.numel() for p in params), bf16=use_bf16)
    checkpoints = Checkpoints(Path(checkpoint_dir), run_identity(cfg.model_dump(), features, named)) if checkpoint_dir is not None else None
    resume = checkpoints.resume(named, optimizer, scheduler) if checkpoints else None
    for key, value in (resume.progress if resume else {}).items():
        setattr(result, key, value)
    every = checkpoint_every or DEFAULT_CHECKPOINT_EVERY[cfg.method]
    bar = tqdm(total=total, initial=result.steps, desc=desc, disable=not progress or not accelerator.is_local_main_process, leave=False)
    start = time.perf_counter() - result.wall_s  # a resumed run counts the time trained before
    window = []
    loss_of.train()
    with (
        frozen_in_bf16(model, use_bf16),
        attention_for(model, longest),
        fused_lora(model, torch.bfloat16 if use_bf16 else None),
        sparse_tied_lookup(model),
    ):
        for epoch, index, order_state, batch in _batches(loader, order, cfg.epochs, resume):
            step = (index + 1) % cfg.grad_accum == 0 or index + 1 == len(loader)
            counted = answer_tokens(batch)
            with nullcontext() if step else accelerator.no_sync(loss_of):
                with autocast():
                    ce, _ = loss_of(**{k: v.to(accelerator.device) for k, v in shard(batch, rank, world).items()})
                    # Summed over this process's rows and divided by the global count, times `world`
                    # because the gradient sync averages: the gradient of one process's mean loss.
                    loss = ce * world / max(counted, 1)
                    extra = extra_loss(model) if extra_loss is not None else None
                    if extra is not None:
                        loss = loss + extra
                ce = accelerator.reduce(ce.detach(), "sum") if world > 1 else ce.detach()
                window.append(ce.item() / max(counted, 1) + (extra.item() if extra is not None else 0.0))
                if not math.isfinite(window[-1]):
                    raise _diverged(desc, window[-1], result.steps + 1, total, epoch, cfg, checkpoints)
                accelerator.backward(loss / cfg.grad_accum)
            result.tokens += int(batch["attention_mask"].sum())
            if step:
                clipped_step(accelerator, optimizer, params, cfg.max_grad_norm)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.peak_mem_mb = max(result.peak_mem_mb, process.memory_info().rss / 2**20 - start_mb)
                result.steps += 1
                result.losses.append(sum(window) / len(window))
                window.clear()
                result.wall_s = time.perf_counter() - start
                bar.set_postfix(epoch=epoch + 1, loss=f"{result.losses[-1]:.3f}", tok_s=f"{result.tokens / result.wall_s:.0f}")
                bar.update(1)
                if checkpoints and result.steps % every == 0 and result.steps < total and accelerator.is_main_process:
                    done = {key: getattr(result, key) for key in PROGRESS}
                    checkpoints.save(named, optimizer, scheduler, epoch=epoch, batch=index + 1, order=order_state, progress=done)
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = result.tokens / result.wall_s if result.wall_s else 0.0
    model.eval()
    result.model = model  # trained in place: the DDP wrapper shares its parameters
    return result


def _check_distribution(accelerator, cfg: TrainConfig) -> None:
    """Refuse what this loop cannot do under `accelerate launch`, before any work: sharded
    parameters, and a global batch smaller than the number of processes."""
    kind = accelerator.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate config: distributed_type {kind} shards the parameters, which Cairn does not support yet (saving a "
            "contribution, its routing statistics and the evaluation read the whole model in one process); use data "
            "parallelism (distributed_type: MULTI_GPU, or MULTI_CPU), see docs/distributed.md"
        )
    if cfg.batch_size < accelerator.num_processes:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch, split between {accelerator.num_processes} processes: it must be at least {accelerator.num_processes}"
        )


def train_contribution(
    base: str, task, cfg: TrainConfig, out, *, progress: bool = True, checkpoint_dir: Path | str | None = None, checkpoint_every: int | None = None
) -> dict:
    """Train on `task` from `base` and save the contribution at `out` with its `cairn.json` manifest.

    With `checkpoint_dir`, training checkpoints there every `checkpoint_every` steps (in a subfolder
    per base model) and resumes from it when it holds this run's checkpoint; the folder is removed
    once the contribution is saved. Under `accelerate launch` every process trains and the main one
    writes; all return the manifest.
    """
    import shutil

    from cairn.distributed import barrier, is_main
    from cairn.models import load_model
    from cairn.store import read_manifest

    model, tokenizer = load_model(base)
    base_fp = model.cairn_fingerprint
    checkpoints = Path(checkpoint_dir) / base_fp[:20] if checkpoint_dir is not None else None
    result = train(
        model, tokenizer, task.train, cfg, progress=progress, desc=f"{cfg.method} on {task.name}", checkpoint_dir=checkpoints, checkpoint_every=checkpoint_every
    )
    if is_main():
        save_contribution(result, tokenizer, task, cfg, out, base=str(base), base_fingerprint=base_fp)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    barrier()  # the other processes return what the main one wrote
    return read_manifest(out)


def save_routing_statistics(model, tokenizer, task, cfg: TrainConfig, out: Path) -> None:
    """Ship the contribution's routing statistics (methods/centroids.py) over the task's training
    prompts, so a mixer can route to it later without the data: per adapted module as the base
    model reads the prompts for LoRA (the LoRA-MoE router reads prompts so), per MLP block of
    the fine-tuned model for FFT (the Mixtral router sits inside it). Prompts are cut to
    `max_length` tokens, as training cuts them (a 50 MB prompt read whole took 21 GB)."""
    from contextlib import nullcontext

    from cairn.methods import centroids

    if cfg.method == "lora":
        inner = model.get_base_model()
        modules = sorted(name for name, m in inner.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    else:
        modules = centroids.mlp_modules(model)
    prompts = [ex.prompt for ex in task.train]
    with model.disable_adapter() if cfg.method == "lora" else nullcontext():
        stats = centroids.input_statistics(model, tokenizer, prompts, modules, max_length=cfg.max_length)
    centroids.save(stats, out, len(prompts))


def save_contribution(result: TrainResult, tokenizer, task, cfg: TrainConfig, out, *, base: str, base_fingerprint: str) -> dict:
    """Write a trained model (PEFT adapter for LoRA, HF folder for FFT), its routing statistics and
    its manifest into a temporary folder that becomes `out` in one rename: a killed save leaves no
    `out` that a later command could take for a whole contribution."""
    from cairn.io import atomic_dir
    from cairn.models import saved_bytes, write_model
    from cairn.store import file_hashes, write_manifest

    out = Path(out)
    with atomic_dir(out, needed=saved_bytes(result.model)) as tmp:
        write_model(result.model, tokenizer, tmp)
        save_routing_statistics(result.model, tokenizer, task, cfg, tmp)
        manifest = {
            "schema": 1,
            "kind": "adapter" if cfg.method == "lora" else "model",
            "base": base,
            "base_fingerprint": base_fingerprint,
            "task": task.name,
            "metric": task.metric,
            "data_hash": task.data_hash(),
            "method": cfg.method,
            "hyperparameters": cfg.model_dump(),
            "train": {
                "examples": len(task.train),
                "losses": result.losses,
                "tokens": result.tokens,
                "steps": result.steps,
                "wall_s": round(result.wall_s, 3),
                "tokens_per_s": round(result.tokens_per_s, 1),
                "peak_mem_mb": round(result.peak_mem_mb, 1),
                "trainable_params": result.trainable_params,
                "bf16": result.bf16,
            },
            "files": file_hashes(tmp),
        }
        write_manifest(tmp, manifest)
    return manifest
