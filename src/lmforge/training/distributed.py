"""Several processes under `torchrun`: the process group, this process's rank, and the reductions the
training loop needs. In a single process every function here is a no-op.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; this module reads them only in
`launched()` and `start()`. Backend nccl on CUDA GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as tdist

from ..errors import LmforgeError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this process's device: on CUDA, the GPU of its
    local rank; on a CPU, the CPU."""
    if not tdist.is_available():
        raise LmforgeError("this PyTorch build has no torch.distributed; run in one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not active():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                 device_id=device if device.type == "cuda" else None)
    return device


def stop() -> None:
    if active():
        tdist.destroy_process_group()


def sum_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
    tdist.all_reduce(t)
    return int(t.item())


def sum_float(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)
    return float(t.item())


def any_true(flag: bool) -> bool:
    """True on every process when it is True on any (a stop requested by one process stops all)."""
    return sum_int(int(flag)) > 0 if active() else flag


def barrier() -> None:
    if active():
        tdist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DistributedDataParallel: gradients are averaged over processes during backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(forward):
    """Inside it, backward passes of a DistributedDataParallel model accumulate without syncing."""
    module = getattr(forward, "_orig_mod", forward)  # torch.compile wraps the DDP module
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
