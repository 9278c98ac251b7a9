"""One training loop for full fine-tuning (FFT) and LoRA, with answer-only loss.

Built on accelerate: under `accelerate launch` (data parallel, DDP on GPUs or gloo on CPUs) every
process draws the same global batches and trains on its rows of each, so N processes follow the
loss curve of one (tests/distributed); `batch_size` is the global batch. Under an FSDP2 config
the loop trains a sharded copy of the model and gathers the trained weights back into the whole
model on every process when it ends, so nothing outside this loop sees a shard. Extra loss
terms (regularisers of later methods) plug in through `extra_loss(model) -> tensor`. Given a
checkpoint folder, the loop checkpoints itself every few optimizer steps and resumes from the
folder's checkpoint (see `cairn.checkpoints`); a NaN or infinite loss stops it with
`TrainingDiverged`, before the bad step touches the weights or the checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
import torch.nn.functional as F

from cairn.checkpoints import Checkpoints, Resume, run_identity, set_rng_states
from cairn.data.batching import IGNORE, encode, length_grouped_loader
from cairn.data.task import Example
from cairn.distributed import fsdp2_requested, shard as fsdp2_shard, whole
from cairn.errors import ConfigError, DataError, TrainingDiverged
from cairn.models import causal_lm_of
from cairn.options import TrainConfig
from cairn.progress import bar as progress_bar
from cairn.speedups import (
    attention_for,
    frozen_in_bf16,
    fused_lora,
    reuse_freed_memory,
    sparse_tied_lookup,
    uses_bf16,
)

# Optimizer steps between checkpoints. For the 135M model on 2 CPU cores a LoRA checkpoint is ~56 MB
# (0.1 s to write, against ~1 s a step); an FFT one ~1.5 GB (weights and two AdamW moments, 4-6 s),
# so every 100 steps (~2.5 min) keeps its cost near 3%.
DEFAULT_CHECKPOINT_EVERY = {"lora": 20, "fft": 100}
@dataclass
class TrainResult:
    model: object
    losses: list[float] = field(default_factory=list)
    extra_losses: list[float] = field(default_factory=list)  # the `extra_loss` term's share of each step's loss (regularised trainings)
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    # The training's own peak memory: the largest increase of the process's resident memory over
    # its value when the training started, sampled at every optimizer step (train() says how).
    peak_mem_mb: float = 0.0
    trainable_params: int = 0
    bf16: bool = False
    # This process's share of the training state, from its tensors after the first optimizer step:
    # the trainable weights, their gradients and the optimizer's moments (the part FSDP2 shards).
    state_mb: float = 0.0


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


def is_trained(name: str, method: str) -> bool:
    """Whether a `method` training trains the parameter `name` by default: every weight for FFT,
    the adapters' for LoRA (so a model that already has adapters continues training them)."""
    return method == "fft" or "lora_" in name


def add_lora(model, cfg: TrainConfig):
    """Wrap `model` with a fresh PEFT LoRA adapter as configured."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, model))


class AnswerLoss(torch.nn.Module):
    """The causal LM whose forward returns (summed cross-entropy over answer tokens, their count).

    Only the answer positions go through the output layer, which skips most of the
    vocabulary-sized matmul (prompts are most of the tokens). Being a module, it is what
    `accelerator.prepare` wraps, so DDP sees the forward pass it hooks its gradient sync into.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    # What accelerate's FSDP2 preparation reads of the module it shards: the layer classes that
    # become one shard group each (else the whole model is one group, gathered whole at every
    # forward), and how to re-tie the output layer to the embeddings after it moves the weights.
    @property
    def _no_split_modules(self) -> list[str]:
        return list(getattr(causal_lm_of(self.model), "_no_split_modules", None) or [])

    def tie_weights(self, *args, **kwargs):
        return causal_lm_of(self.model).tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, labels):
        causal_lm = causal_lm_of(self.model)
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def clipped_step(accelerator, optimizer, params: list[torch.Tensor], max_norm: float | None, *, sharded: bool = False) -> None:
    """One optimizer step on gradients clipped to total norm `max_norm` (None: unclipped).

    A fused AdamW divides the gradients by its `grad_scale` as it reads them (the hook GradScaler
    unscales through), so there clipping is one read of the gradients for their norm instead of a
    read and a scaling pass: about 1 GB of memory traffic a step for a full 135M-parameter model.
    Sharded gradients (FSDP2) take the norm of the whole gradient, summed over the shards; anything
    else clips as accelerate does.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    fused = all(group.get("fused") for group in inner.param_groups) and getattr(accelerator, "scaler", None) is None
    if max_norm and sharded:
        grads = [p.grad for p in params if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, whole(torch.nn.utils.get_total_norm(grads)))
    elif max_norm and not fused:
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


PROGRESS = ("steps", "tokens", "losses", "extra_losses", "wall_s", "peak_mem_mb", "state_mb")  # the TrainResult fields a checkpoint keeps


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
    use_bf16 = uses_bf16(cfg)
    # Precision is chosen per run with torch.autocast rather than Accelerator(mixed_precision=...),
    # which is fixed once per process; under `accelerate launch` the user's config still applies.
    # Gradient accumulation is counted here, per epoch (an epoch's last batch always steps):
    # accelerate's own counting needs a prepared data loader, and this loop shards batches itself.
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    _check_distribution(accelerator, cfg)
    sharded = fsdp2_requested(accelerator)
    if sharded and extra_loss is not None:
        raise ConfigError(
            f"{desc}: a regularised training (an extra loss term over the whole adapter or model, e.g. olora's orthogonality "
            "penalty) cannot run sharded by FSDP2, whose processes each hold a shard of it; train it with data parallelism "
            "(distributed_type: MULTI_GPU): LoRA adapters are small enough (docs/distributed.md)"
        )
    if cfg.method == "lora" and not hasattr(model, "peft_config"):
        model = add_lora(model, cfg)
    trainable = trainable or (lambda name: is_trained(name, cfg.method))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))

    def adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        fused = not sharded and accelerator.device.type in ("cpu", "cuda")  # the fused kernel takes no DTensors
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)

    if sharded:  # FSDP2 shards a copy in place; `model` stays whole and takes the trained weights at the end
        loss_of, optimizer = fsdp2_shard(accelerator, AnswerLoss(copy.deepcopy(model)), adamw)
        named = {name.removeprefix("model."): p for name, p in loss_of.named_parameters() if p.requires_grad}
    else:
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        loss_of, optimizer = accelerator.prepare(AnswerLoss(model), adamw(list(named.values())))
    params = list(named.values())
    features = [encode(ex, tokenizer, cfg.max_length) for ex in examples]
    loader = length_grouped_loader(features, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
    order = loader.sampler.generator
    total = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    # The loader stays unprepared: each process draws every global batch and keeps its `shard`. So
    # does the scheduler: prepared, it would step once per process at every optimizer step.
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        getattr(optimizer, "optimizer", optimizer),
        num_warmup_steps=int(cfg.warmup_ratio * total),
        num_training_steps=total,
    )
    autocast = lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    longest = max(len(f["input_ids"]) for f in features)
    result = TrainResult(model=None, trainable_params=sum(p.numel() for p in params), bf16=use_bf16)
    identity = run_identity({**cfg.model_dump(), **({"fsdp2": True} if sharded else {})}, features, named)  # a sharded checkpoint holds shards
    checkpoints = Checkpoints(Path(checkpoint_dir), identity, sharded=loss_of if sharded else None) if checkpoint_dir is not None else None
    resume = checkpoints.resume(named, optimizer, scheduler) if checkpoints else None
    for key, value in (resume.progress if resume else {}).items():
        setattr(result, key, value)
    every = checkpoint_every or DEFAULT_CHECKPOINT_EVERY[cfg.method]
    bar = progress_bar(total=total, initial=result.steps, desc=desc, disable=not progress or not accelerator.is_local_main_process, leave=False)
    start = time.perf_counter() - result.wall_s  # a resumed run counts the time trained before
    window, extra_window = [], []  # per-batch losses of the current step (the extra term alone in extra_window)
    loss_of.train()
    with ExitStack() as speedups:
        if not sharded:  # each rewrites the whole model's modules or weights, which FSDP2 holds as shards
            for speedup in (frozen_in_bf16(model, use_bf16), attention_for(model, longest), fused_lora(model, torch.bfloat16 if use_bf16 else None), sparse_tied_lookup(model)):
                speedups.enter_context(speedup)
        for epoch, index, order_state, batch in _batches(loader, order, cfg.epochs, resume):
            step = (index + 1) % cfg.grad_accum == 0 or index + 1 == len(loader)
            counted = answer_tokens(batch)
            with nullcontext() if step else _no_sync(accelerator, loss_of, sharded):
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
                if extra is not None:
                    extra_window.append(extra.item())
                if not math.isfinite(window[-1]):
                    raise _diverged(desc, window[-1], result.steps + 1, total, epoch, cfg, checkpoints)
                accelerator.backward(loss / cfg.grad_accum)
            result.tokens += int(batch["attention_mask"].sum())
            if step:
                clipped_step(accelerator, optimizer, params, cfg.max_grad_norm, sharded=sharded)
                result.state_mb = result.state_mb or _state_mb(params, optimizer)  # gradients and moments all allocated now
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.peak_mem_mb = max(result.peak_mem_mb, process.memory_info().rss / 2**20 - start_mb)
                result.steps += 1
                result.losses.append(sum(window) / len(window))
                window.clear()
                if extra_window:
                    result.extra_losses.append(sum(extra_window) / len(extra_window))
                    extra_window.clear()
                result.wall_s = time.perf_counter() - start
                bar.set_postfix(epoch=epoch + 1, loss=f"{result.losses[-1]:.3f}", tok_s=f"{result.tokens / result.wall_s:.0f}")
                bar.update(1)
                if checkpoints and result.steps % every == 0 and result.steps < total and (sharded or accelerator.is_main_process):
                    done = {key: getattr(result, key) for key in PROGRESS}
                    checkpoints.save(named, optimizer, scheduler, epoch=epoch, batch=index + 1, order=order_state, progress=done)
    bar.close()
    if sharded:
        _gather_into(model, named)
        del loss_of, optimizer, named, params
        accelerator.free_memory()  # accelerate keeps the sharded copy and its optimizer otherwise
        model.to(accelerator.device)  # where data parallelism leaves it
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = result.tokens / result.wall_s if result.wall_s else 0.0
    model.eval()
    result.model = model  # trained in place (the DDP wrapper shares its parameters), or gathered into it
    return result


def _state_mb(params: list[torch.Tensor], optimizer) -> float:
    """MB of this process's trainable weights, gradients (as allocated: kept through the step) and
    optimizer states: its shards of them under FSDP2."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    tensors = [*params, *(p.grad for p in params if p.grad is not None), *moments]
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**20


@contextmanager
def _no_sync(accelerator, module, sharded: bool):
    """No gradient sync for the backward passes inside (gradient accumulation): FSDP2's switch on
    a sharded module (accelerate's `no_sync` knows only DDP's on CPU processes), else accelerate's."""
    if not sharded:
        with accelerator.no_sync(module):
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _gather_into(model, named: dict[str, torch.Tensor]) -> None:
    """Copy the trained parameters of FSDP2's sharded copy (`named`, by the names they have in
    `model`) into `model`, whole, on every process: one parameter gathered at a time, so the
    gather needs one parameter's memory beyond the model's."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            own[name].copy_(whole(p.detach()))


def _check_distribution(accelerator, cfg: TrainConfig) -> None:
    """Refuse what this loop cannot do under `accelerate launch`, before any work: DeepSpeed and
    Megatron-LM engines, and a global batch smaller than the number of processes. (FSDP2 is
    checked by `cairn.distributed.fsdp2_requested`.)"""
    from accelerate.utils import parse_flag_from_env

    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED" or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):  # on CPUs accelerate runs a DeepSpeed config as MULTI_CPU
        raise ConfigError(
            "accelerate config: distributed_type DEEPSPEED: Cairn's training loop does not drive a DeepSpeed engine (its "
            "backward, step, clipping and checkpoints are the engine's own). For ZeRO-3's sharding of parameters, gradients "
            "and optimizer states use FSDP2, which shards the same three (distributed_type: FSDP, fsdp_config: {fsdp_version: 2, "
            "fsdp_reshard_after_forward: true}); configs/accelerate/fsdp2.yaml is one. A DeepSpeed launch would also need CUDA "
            "GPUs and `pip install deepspeed` (docs/distributed.md)"
        )
    if kind == "MEGATRON_LM":
        raise ConfigError("accelerate config: distributed_type MEGATRON_LM is not supported; use MULTI_GPU (data parallel) or FSDP with fsdp_version 2 (docs/distributed.md)")
    if cfg.batch_size < accelerator.num_processes:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch, split between {accelerator.num_processes} processes: it must be at least {accelerator.num_processes}"
        )
