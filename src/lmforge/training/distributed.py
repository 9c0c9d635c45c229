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


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    return rank() == 0


def cpu_threads(threads: int | None) -> int:
    """A process's intra-op threads on a CPU: `threads` if given, else its share of the physical cores
    (each process of a torchrun job on this machine takes an equal share; all of them without one)."""
    from ..device import physical_cores

    return threads or max(1, physical_cores() // local_world_size())


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


def max_float(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def sum_floats(values: list[float]) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool) -> bool:
    """True on every process when it is True on any (a stop requested by one process stops all)."""
    return sum_int(int(flag)) > 0 if active() else flag


def on_main(fn, *args) -> None:
    """Run `fn(*args)` on process 0 only (a file write); if it fails there, every process stops with
    the error, instead of the others waiting for it forever."""
    _run_turn(is_main(), "process 0", fn, *args)


def _run_turn(mine: bool, who: str, fn, *args):
    """`fn(*args)` where `mine`, then, on every process, the user error it raised on any of them: the
    others stop with a line pointing to it instead of waiting for a process that has gone."""
    result, error = None, None
    if mine:
        try:
            result = fn(*args)
        except LmforgeError as e:
            error = e
    if any_true(error is not None):
        raise error or LmforgeError(f"{who} stopped the run (its message says why)")
    return result


def barrier() -> None:
    if active():
        tdist.barrier()


def main_first(fn):
    """fn() on process 0 first, then on the others once it has finished, and its result: for work that
    fills a cache (the prepared data) which the others then read instead of repeating the work at once.
    Every process must call it. If it fails with a user error on one process, every process stops with
    that error (the others with a line pointing to it) instead of waiting for one that has gone."""
    first = _run_turn(is_main(), "another process", fn)
    later = _run_turn(not is_main(), "another process", fn)
    return first if is_main() else later


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DistributedDataParallel: gradients are averaged over processes during backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: every block's parameters, gradients and optimizer state sharded over the processes
    (gathered for each block's forward and backward), then the rest at the root. In place."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # A Transformer block returns its attention's values (a view) for the value residual, and a recurrent
    # model returns views among its outputs and state; they are read out of place, which keeps
    # FSDP's gradients right (test_distributed: FSDP ends where DDP does, for both), so PyTorch's warning
    # about in-place ops on such a view is not for the user.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|RNNModel)\) returned a view tensor")
    body = getattr(model, "lm", model)  # a classifier's language model
    for block in getattr(body, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP wraps `model` (its parameters are sharded DTensors between forwards, but a module
    that a forward without gradients gathered holds plain tensors until it is resharded)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


_FULL = None


def _full_options():
    global _FULL
    if _FULL is None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _FULL


def _reshard(model: torch.nn.Module) -> None:
    """Put an FSDP model's parameters back into their shards: a forward without gradients (evaluation)
    leaves the root module, which for an LSTM holds every weight, with its gathered parameters."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, by name: gathered from the shards of an FSDP model (all processes must call
    it), else the module's own state_dict (no copy)."""
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        _reshard(model)
        return get_model_state_dict(model, options=_full_options())
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model).state_dict()


def full_optimizer_states(model: torch.nn.Module, optimizers: list) -> list[dict]:
    """Each optimizer's state keyed by parameter name (not position), whole: the same for one process,
    DDP or FSDP, so a run can resume with any number of processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if sharded(model):
        _reshard(model)
    return [get_optimizer_state_dict(model, opt, options=_full_options()) for opt in optimizers]


def load_full_states(model: torch.nn.Module, optimizers: list, weights: dict, optimizer_states: list[dict]) -> None:
    """Put whole weights and name-keyed optimizer states back into a model (sharded or not)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    for opt, state in zip(optimizers, optimizer_states):
        if all(isinstance(k, int) for k in state["state"]):  # resume points from before name keys
            opt.load_state_dict(state)
        else:
            set_optimizer_state_dict(model, opt, state, options=options)


def no_sync(forward):
    """Inside it, backward passes of a DistributedDataParallel model accumulate without syncing."""
    module = getattr(forward, "_orig_mod", forward)  # torch.compile wraps the DDP module
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
