"""Who does what when `accelerate launch` starts several processes.

Every process trains (the loop in `cairn.training` splits each global batch between them); only
the main process writes files and evaluates, and the others wait for it where they read what it
wrote. Run alone, there is one process, it is the main one, and waiting is free.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from cairn.errors import ConfigError


def _state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # A singleton: joins the launcher's process group on first use. ACCELERATE_USE_CPU=1 makes
    # processes started by `accelerate launch --multi_gpu` join over gloo on a machine without GPUs,
    # as `Accelerator` does.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        # Seen with an FSDP config on a machine without GPUs: accelerate leaves every process on
        # its own, each would think it is the main one and write the same files.
        raise ConfigError(
            f"started as {launched} processes (WORLD_SIZE) but accelerate joined them as {state.num_processes} "
            f"(distributed_type {state.distributed_type.value}): its FSDP and DeepSpeed modes need GPUs; on CPUs use "
            "distributed_type MULTI_CPU, or `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1 (docs/distributed.md)"
        )
    return state


def is_main() -> bool:
    """True in the process that writes and evaluates (the only one when not launched)."""
    return _state().is_main_process


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    _state().wait_for_everyone()


def main_writes(write) -> None:
    """Call `write()` in the main process only; every process goes on once it is done."""
    if is_main():
        write()
    barrier()


# --- sharded training (FSDP2) ----------------------------------------------------------------------
# accelerate and PyTorch do the sharding; what Cairn adds is where to start it and how to read the
# whole model back. Outside `cairn.training.train` every process holds the whole model, as it does
# after loading one: saving, routing statistics, fingerprints and evaluation read it unchanged.


def fsdp2_launch() -> bool:
    """True in processes that `accelerate launch` started with an FSDP2 config (see `fsdp2_requested`)."""
    return fsdp2_requested(_state())


def fsdp2_requested(accelerator) -> bool:
    """True when `accelerate launch` was given an FSDP config. On GPUs accelerate reports it as
    distributed_type FSDP; on CPU processes (ACCELERATE_USE_CPU=1) it falls back to MULTI_CPU but
    keeps the config's FSDP settings in the environment, and PyTorch's FSDP2 runs there over gloo.
    FSDP1 (fsdp_version 1) is refused: its flat parameters are not the per-parameter DTensors the
    rest of this module reads."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    if accelerator.distributed_type == DistributedType.FSDP:
        version = accelerator.state.fsdp_plugin.fsdp_version
    elif accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        # MULTI_GPU: accelerate's PartialState (`fsdp2_launch`), which leaves FSDP to the Accelerator
        version = int(os.environ.get("FSDP_VERSION", "1"))
    else:
        return False
    if version != 2:
        raise ConfigError(f"accelerate config: fsdp_version {version}; Cairn shards with FSDP2: set fsdp_config: {{fsdp_version: 2}} (docs/distributed.md)")
    return True


def shard(accelerator, module, optimizer):
    """`(module, optimizer)` with `module`'s parameters sharded by FSDP2 between the processes, as
    the launch's FSDP settings say (auto-wrap policy, resharding, offload): through
    `accelerator.prepare` where accelerate runs FSDP (GPUs), else through the very function that
    `prepare` calls, on the CPU mesh (accelerate's FSDP mode needs GPUs). `module` is sharded in
    place. `optimizer(params)` builds the optimizer: on GPUs over the parameters before sharding
    (`prepare` moves it onto the shards, as accelerate requires), on CPUs over the shards."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare(module, optimizer([p for p in module.parameters() if p.requires_grad]))
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings `accelerate launch` exported
    view = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", device=accelerator.device, is_main_process=is_main())
    module = fsdp2_prepare_model(view, module)
    return module, accelerator.prepare(optimizer([p for p in module.parameters() if p.requires_grad]))


def whole(tensor):
    """The whole value of a parameter or state that FSDP2 shards (a DTensor), gathered on every
    process; any other tensor as it is. Every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
