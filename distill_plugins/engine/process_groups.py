"""Initialise torch.distributed and megatron's parallel_state from a recipe.

Design
------
megatron-core keeps its process groups in the module-global
``megatron.core.parallel_state``; distill_plugins' own code takes explicit groups
through :class:`~distill_plugins.parallel.ParallelContext`. :func:`initialize`
does both: it starts torch.distributed when needed (``gloo`` on CPU, ``nccl`` on
GPU, rank/world size from the torchrun environment, a single process when the
environment is absent), creates megatron's TP/PP/DP groups in megatron's default
order (``tp-cp-ep-dp-pp``), seeds megatron's RNG tracker, and returns the
:class:`ParallelContext` (tp/dp/pp groups) the loss and the parts use.

Usage::

    from distill_plugins.engine import process_groups as dps
    ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=True)
    ...
    dps.destroy()
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.parallel import ParallelContext
from distill_plugins.recipe.schema import ParallelSpec

__all__ = ["initialize", "init_torch_distributed", "free_port", "destroy", "parallel_context", "data_parallel_size",
           "is_pipeline_last_stage", "is_pipeline_first_stage", "pipeline_rank"]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _megatron():
    """megatron-core's ``parallel_state`` and ``tensor_parallel`` modules."""
    # megatron-core takes seconds to import and this module is also on megatron-free paths (free_port for
    # distill_plugins.testing, `distill export`'s parser under `distill --help`): loaded on first use
    from megatron.core import parallel_state, tensor_parallel

    return parallel_state, tensor_parallel


def init_torch_distributed(cpu: bool, timeout_minutes: int) -> None:
    """The default process group: from torchrun's environment, or a 1-rank group in this process.

    A single process (no ``RANK``/``WORLD_SIZE``, or ``WORLD_SIZE=1``) rendezvous through an in-process
    store: no TCP port, so a stale ``MASTER_PORT`` inherited from a parent process cannot collide.
    """
    if dist.is_initialized():
        return
    backend = "gloo" if cpu else "nccl"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    single = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if single:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def initialize(parallel: ParallelSpec, *, seed: int = 1234, cpu: bool = False,
               timeout_minutes: int = 30) -> ParallelContext:
    """Start distributed (if needed) and megatron's model-parallel groups; seed the RNG.

    Args:
        parallel: TP and PP sizes; DP is ``world_size / (TP * PP)``.
        seed: megatron's ``model_parallel_cuda_manual_seed`` seed (also seeds the
            CPU generator identically on every rank).
        cpu: gloo backend (the CPU layer must already be on).
        timeout_minutes: collective timeout.

    Returns:
        The :class:`ParallelContext` with megatron's TP, DP and PP groups
        (``None`` for groups of size 1 is *not* used: the real groups are given).

    Raises:
        RecipeError: the world size is not a multiple of TP x PP, or a virtual
            (interleaved) pipeline was requested.
    """
    ps, tensor_parallel = _megatron()
    if parallel.virtual_pipeline is not None:
        raise RecipeError(f"parallel.virtual_pipeline={parallel.virtual_pipeline}: interleaved pipeline schedules "
                          "are not supported with a co-located teacher; remove the key")
    init_torch_distributed(cpu, timeout_minutes)
    world = dist.get_world_size()
    mp = parallel.tensor * parallel.pipeline
    # already initialised (e.g. a teacher on its own ranks, engine/role_groups.py): the world holds more than this layout
    if world % mp and not ps.model_parallel_is_initialized():
        raise RecipeError(f"world size {world} is not a multiple of parallel.tensor x parallel.pipeline = "
                          f"{parallel.tensor} x {parallel.pipeline}; launch a multiple of {mp} processes")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (
                parallel.tensor, parallel.pipeline):
            raise DistillError("megatron parallel_state is already initialised with other sizes; call destroy() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=True,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_context()


def parallel_context() -> ParallelContext:
    """The :class:`ParallelContext` of megatron's current groups."""
    ps, _ = _megatron()
    return ParallelContext(
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
    )


def data_parallel_size() -> int:
    ps, _ = _megatron()
    return ps.get_data_parallel_world_size()


def pipeline_rank() -> int:
    ps, _ = _megatron()
    return ps.get_pipeline_model_parallel_rank()


def is_pipeline_first_stage() -> bool:
    ps, _ = _megatron()
    return ps.is_pipeline_first_stage()


def is_pipeline_last_stage() -> bool:
    ps, _ = _megatron()
    return ps.is_pipeline_last_stage()


def destroy(destroy_process_group: bool = False) -> None:
    """Tear down megatron's groups (and torch.distributed when asked)."""
    ps, _ = _megatron()
    ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
