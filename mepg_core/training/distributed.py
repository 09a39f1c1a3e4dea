"""One training process among several: rank facts, DDP over the trainable parameters, collectives.

A run started by ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) gets an
:class:`AccelerateRunner`: Hugging Face ``accelerate`` sets up the process group (NCCL on GPUs, gloo on
CPUs), picks this rank's device and wraps the parameters that train in ``DistributedDataParallel``, so
their gradients are all-reduced (averaged) in buckets during ``backward``. A plain single process gets a
:class:`LocalRunner` (no package beyond torch). Both offer the same small interface the trainers use:

- ``rank`` / ``world_size`` / ``local_rank`` / ``is_main`` / ``device``;
- ``wrap(module)``: the module whose parameters train (DDP in a distributed run), then
  ``forward(*args)`` runs it and ``sync(enabled)`` suspends the gradient all-reduce for all but the last
  micro-batch of an accumulated step;
- ``all_sum(tensor)``, ``barrier()``, ``gather_objects(obj)`` (a list, one per rank, on every rank).

:func:`rng_state` / :func:`set_rng_state` capture and restore this process's global random generators
(Python, torch CPU, the current CUDA device) as plain tensors for a ``.safetensors`` checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import torch


def launched_world_size() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class ParameterHolder(torch.nn.Module):
    """Registers given parameters (shared, not copied) so DDP all-reduces exactly those; ``forward(fn)``
    returns ``fn()`` — the loss of a pass that uses them somewhere inside (e.g. a patched UNet)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        super().__init__()
        self._names = [name for name, _ in named]
        self.held = torch.nn.ParameterList([param for _, param in named])

    def forward(self, fn):
        return fn()


class LocalRunner:
    """A single training process (no process group)."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_main = True
    distributed = False

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.module: torch.nn.Module | None = None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        self.module = module
        return module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def describe(self) -> str:
        return f"1 process on {self.device}"

    def close(self) -> None:
        return None


class AccelerateRunner(LocalRunner):
    """This rank of a distributed run, through ``accelerate`` (install it: ``pip install accelerate``).

    ``cpu=True`` (or no GPU) uses the gloo backend on CPUs. The DDP wrapper only sees the module given to
    :meth:`wrap`, so only its parameters are broadcast at the start and all-reduced in ``backward``.
    """

    distributed = True

    def __init__(self, cpu: bool = False):
        try:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs
        except ImportError as error:
            raise RuntimeError(
                "this run was started by a distributed launcher (WORLD_SIZE > 1), which needs the 'accelerate' "
                "package: pip install accelerate (or the pack's 'train' extra)"
            ) from error
        # A host may not run every gated site (or every LoRA) in every pass: let DDP find the unused ones
        # (a walk over the autograd graph per step, small next to a UNet pass).
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available(), kwargs_handlers=[ddp])
        state = self.accelerator.state
        self.rank = state.process_index
        self.world_size = state.num_processes
        self.local_rank = state.local_process_index
        self.is_main = state.is_main_process
        self.device = self.accelerator.device
        self.module = None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        # device_placement=False: the host (ComfyUI) already put the parameters where its model runs.
        self.module = self.accelerator.prepare_model(module, device_placement=False)
        return self.module

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.to(self.device).clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(tensor.device)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def describe(self) -> str:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        return f"rank {self.rank} of {self.world_size} on {self.device} ({backend})"

    def close(self) -> None:
        if torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()


def make_runner(cpu: bool = False) -> LocalRunner:
    """An :class:`AccelerateRunner` when a launcher started several processes, else a :class:`LocalRunner`
    on the GPU (``cuda:LOCAL_RANK``) when there is one and ``cpu`` is not set. Call it before the host
    loads models: on GPUs it makes this rank's device the current one, which ComfyUI then uses."""
    if launched_world_size() > 1:
        return AccelerateRunner(cpu=cpu)
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return LocalRunner(torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))


def rank_positions(count: int, rank: int, world: int) -> list[int]:
    """Positions ``0 … count-1`` of a global batch that rank ``rank`` of ``world`` takes: a contiguous
    slice, as even as possible; ``[-1]`` (one padding pass, weight 0) when there are fewer than ranks, so
    every rank runs the same number of synchronised passes."""
    per, extra = divmod(count, world)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (1 if rank < extra else 0))) or [-1]


# --------------------------------------------------------------------------------------------------
# Random generator state (plain tensors and JSON, for .safetensors checkpoints)


def rng_state() -> tuple[dict[str, torch.Tensor], str]:
    """``({"torch": uint8 state, "cuda": uint8 state (when CUDA is initialised)}, python state as JSON)``."""
    tensors = {"torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state().clone()
    version, internal, gauss = random.getstate()
    return tensors, json.dumps([version, list(internal), gauss])


def set_rng_state(tensors: dict[str, torch.Tensor], python_state: str) -> None:
    """Restore what :func:`rng_state` captured (the CUDA part only where CUDA is there)."""
    torch.set_rng_state(tensors["torch"].to(torch.uint8).cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8).cpu())
    version, internal, gauss = json.loads(python_state)
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def main_first(runner: LocalRunner) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. creating shared folders)."""
    if not runner.is_main:
        runner.barrier()
    try:
        yield
    finally:
        if runner.is_main:
            runner.barrier()
