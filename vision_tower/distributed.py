"""Where this process stands in a multi-process run: rank, world size, local rank, and how to end one.

torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK; a single process is rank 0 of 1.
Extraction needs no process group (ranks share nothing); training uses the one accelerate creates.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

from .errors import ConfigError


class DistEnv(NamedTuple):
    rank: int
    world: int
    local_rank: int


def dist_env() -> DistEnv:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) alone.

    Read from the environment rather than the process group, so it holds before (and without)
    `init_process_group`."""
    env = DistEnv(*(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
    if env.world < 1 or not 0 <= env.rank < env.world:
        raise ConfigError(f"RANK={env.rank} and WORLD_SIZE={env.world} do not describe a process of a run; "
                          "unset them for a single process, or launch with torchrun / accelerate launch")
    return env


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`--device` as a torch device ("cuda" is this process's GPU under torchrun); a device this machine
    does not have is refused with what it has."""
    name = f"cuda:{local_rank}" if name == "cuda" else name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is "
                              "False); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def is_main_process() -> bool:
    return dist_env().rank == 0


def process_group_rank() -> int:
    """The rank in the initialised process group, else 0 (for code that runs collectives)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank of the process group; nothing to wait for without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group(code: int = 0) -> None:
    """End a successful multi-process run: destroy the process group, flush, and exit without the
    interpreter's teardown. Objects still holding the group (FSDP meshes, accelerate's state) are
    otherwise destroyed during teardown, where gloo's threads abort the process now and then
    (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489), turning a
    finished run into a failed launch. Does nothing outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class DieWithParent:
    """A DataLoader `worker_init_fn`: the worker is killed when the process that started it dies (Linux
    `PR_SET_PDEATHSIG`), so a `kill -9` of a run leaves no orphaned workers decoding on, holding its
    memory and its files. Picklable; elsewhere than Linux it does nothing."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int = 0) -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != self.parent:  # the parent died before the call: nobody is left to signal us
            os._exit(1)
