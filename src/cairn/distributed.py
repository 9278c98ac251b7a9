"""Who does what when `accelerate launch` starts several processes.

Every process trains (the loop in `cairn.training` splits each global batch between them); only
the main process writes files and evaluates, and the others wait for it where they read what it
wrote. Run alone, there is one process, it is the main one, and waiting is free.
"""

from __future__ import annotations

import os

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
