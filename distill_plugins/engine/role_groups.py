"""Process groups for a teacher on its own ranks: both roles' megatron groups, this rank's installed.

Design
------
megatron-core keeps one parallel layout per process, in the module globals of
``megatron.core.parallel_state``; its ``initialize_model_parallel`` lays one
layout over the whole world. With ``teacher_parallel`` the world holds two
layouts (:mod:`.teacher_ranks`: students first, then teachers), so
:func:`initialize_roles`:

1. starts torch.distributed (as :func:`.process_groups.initialize` does);
2. on *every* process, creates *every* group of *both* roles, student role first,
   then teacher role, in one fixed order (``torch.distributed.new_group`` is
   collective over the world: every process calls it for every group, member or
   not). The rank lists come from megatron's own ``RankGenerator`` with
   ``rank_offset`` set to the role's first rank, the enumeration
   ``initialize_model_parallel`` uses (megatron's ``HyperCommGrid`` gives the same
   one, but needs einops, which is not a dependency here). The groups mirror
   ``initialize_model_parallel`` for context-parallel size 1, expert-parallel size 1
   and one distributed-optimizer instance, the only case the engine runs: data
   (plus gloo twins), context, model, tensor, pipeline, embedding, position
   embedding, tensor+data, tensor+context, the expert groups (equal to the dense
   ones when there is one expert rank) and the distributed-optimizer instance
   group (the whole role);
3. installs *this process's role's* groups into ``parallel_state``, so student
   code on student ranks and teacher code on teacher ranks see an ordinary
   megatron layout: ``get_tensor_model_parallel_group()``, ``is_pipeline_last_stage()``,
   DDP, the optimizer, gradient clipping and the pipeline schedule work unchanged;
4. creates the **payload group**: every last-stage rank of both roles. Payloads
   and the start-up weight transfer travel there by point-to-point; the world
   group is left to the per-step agreements (NaN guard, stop signal,
   checkpoints). Keeping them apart matters on NCCL, which runs the operations
   of one communicator in the order they were queued on each rank: a payload
   send queued before an agreement would wait on a receive the peer queues after it.

``destroy()`` of :mod:`.process_groups` (megatron's ``destroy_model_parallel``)
clears the installed globals as usual.

Usage::

    roles = initialize_roles(recipe, cpu=True)
    if roles.is_teacher: ...           # parallel_state now holds the teacher's layout here
    roles.payload_group                # point-to-point between the two roles' last stages
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from distill_plugins.engine.process_groups import init_torch_distributed
from distill_plugins.engine.teacher_ranks import TEACHER, RoleLayout, SeparateLayout
from distill_plugins.errors import DistillError
from distill_plugins.parallel import ParallelContext
from distill_plugins.recipe.schema import Recipe

__all__ = ["Roles", "initialize_roles", "role_rank_lists", "GROUP_KINDS"]

#: (name, RankGenerator token, backend) of every group a role gets, in creation order.
#: ``None`` backend = the default one (gloo on CPU, nccl on GPU).
GROUP_KINDS: tuple[tuple[str, str, Any], ...] = (
    ("dp_cp", "dp-cp", None), ("dp_cp_gloo", "dp-cp", "gloo"), ("dp", "dp", None), ("dp_gloo", "dp", "gloo"),
    ("cp", "cp", None), ("mp", "tp-pp", None), ("tp", "tp", None), ("pp", "pp", None),
    ("tp_dp_cp", "tp-dp-cp", None), ("tp_dp", "tp-dp", None), ("tp_cp", "tp-cp", None),
    ("ep", "ep", None), ("expt_tp", "tp", None), ("tp_ep", "tp-ep", None), ("tp_ep_pp", "tp-ep-pp", None),
    ("expt_dp", "dp", None), ("expt_dp_gloo", "dp", "gloo"),
)
#: megatron's default order (``initialize_model_parallel(order=...)``)
ORDER = "tp-cp-ep-dp-pp"


@dataclass
class Roles:
    """This process's place in a job with a separate teacher.

    Attributes:
        layout: the whole split.
        role: this process's :class:`RoleLayout`.
        rank: global rank.
        ctx: this role's TP/DP/PP groups (the :class:`ParallelContext` the loss uses).
        payload_group: last-stage ranks of both roles (point-to-point payloads).
        role_group: every rank of this role.
    """

    layout: SeparateLayout
    role: RoleLayout
    rank: int
    ctx: ParallelContext
    payload_group: Any
    role_group: Any

    @property
    def is_teacher(self) -> bool:
        return self.role.role == TEACHER

    @property
    def coords(self) -> tuple[int, int, int]:
        """``(tp, dp, pp)`` of this rank in its role."""
        return self.role.coords(self.rank)

    @property
    def is_last_stage(self) -> bool:
        return self.coords[2] == self.role.pipeline - 1


def role_rank_lists(role: RoleLayout) -> dict[str, list[list[int]]]:
    """Group name -> rank lists of one role (global ranks), from megatron's ``RankGenerator``."""
    gen = ps.RankGenerator(tp=role.tensor, ep=1, dp=role.data, pp=role.pipeline, cp=1, order=ORDER,
                           rank_offset=role.offset)
    lists = {name: gen.get_ranks(token) for name, token, _ in GROUP_KINDS}
    lists["embd"] = [ps.default_embedding_ranks(r) for r in lists["pp"]]
    lists["pos_embd"] = [ps.default_position_embedding_ranks(r) for r in lists["pp"]]
    lists["intra_dist_opt"] = [list(role.ranks)]
    return lists


def _backends() -> dict[str, Any]:
    return {name: backend for name, _, backend in GROUP_KINDS}


def initialize_roles(recipe: Recipe, *, cpu: bool = False, timeout_minutes: int = 30) -> Roles:
    """Create both roles' groups on every process and install this process's role into ``parallel_state``.

    Args:
        recipe: a recipe with ``teacher_parallel``.
        cpu: gloo backend (the CPU layer must already be on).
        timeout_minutes: collective timeout of every group.

    Returns:
        This process's :class:`Roles`.

    Raises:
        RecipeError: the world does not split as the recipe asks (naming the keys).
        DistillError: megatron's parallel state is already initialised.
    """
    if ps.model_parallel_is_initialized():
        raise DistillError("megatron parallel_state is already initialised; call "
                           "distill_plugins.engine.process_groups.destroy() first")
    init_torch_distributed(cpu, timeout_minutes)
    layout = SeparateLayout.from_recipe(recipe, dist.get_world_size())
    rank = dist.get_rank()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    backends = _backends()
    mine: dict[str, tuple[Any, list[int]]] = {}
    for role in (layout.student, layout.teacher):
        for name, lists in role_rank_lists(role).items():
            for ranks in lists:
                group = dist.new_group(ranks=ranks, timeout=timeout, backend=backends.get(name))
                if rank in ranks:
                    mine[name] = (group, ranks)
    payload_ranks = sorted(layout.student.last_stage_ranks() + layout.teacher.last_stage_ranks())
    payload_group = dist.new_group(ranks=payload_ranks, timeout=timeout)
    role = layout.role_of(rank)
    _install(mine)
    torch.manual_seed(recipe.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(recipe.seed)
    ctx = ParallelContext(tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
                          pp_group=ps.get_pipeline_model_parallel_group())
    return Roles(layout=layout, role=role, rank=rank, ctx=ctx,
                 payload_group=payload_group if rank in payload_ranks else None,
                 role_group=mine["intra_dist_opt"][0])


def _install(mine: dict[str, tuple[Any, list[int]]]) -> None:
    """Write this rank's groups into megatron's ``parallel_state`` globals (see the module docstring)."""

    def group(name):
        return mine[name][0] if name in mine else None

    def ranks(name):
        return mine[name][1] if name in mine else None

    values = {
        "_DATA_PARALLEL_GROUP_WITH_CP": group("dp_cp"), "_DATA_PARALLEL_GROUP_WITH_CP_AG": None,
        "_DATA_PARALLEL_GROUP_WITH_CP_GLOO": group("dp_cp_gloo"), "_DATA_PARALLEL_GLOBAL_RANKS_WITH_CP": ranks("dp_cp"),
        "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP": group("dp_cp"),
        "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO": group("dp_cp_gloo"),
        "_DATA_PARALLEL_GROUP": group("dp"), "_DATA_PARALLEL_GROUP_GLOO": group("dp_gloo"),
        "_DATA_PARALLEL_GLOBAL_RANKS": ranks("dp"),
        "_CONTEXT_PARALLEL_GROUP": group("cp"), "_CONTEXT_PARALLEL_GLOBAL_RANKS": ranks("cp"),
        "_MODEL_PARALLEL_GROUP": group("mp"), "_MODEL_PARALLEL_GLOBAL_RANKS": ranks("mp"),
        "_TENSOR_MODEL_PARALLEL_GROUP": group("tp"), "_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS": ranks("tp"),
        "_PIPELINE_MODEL_PARALLEL_GROUP": group("pp"), "_PIPELINE_GLOBAL_RANKS": ranks("pp"),
        "_EMBEDDING_GROUP": group("embd"), "_EMBEDDING_GLOBAL_RANKS": ranks("embd"),
        "_POSITION_EMBEDDING_GROUP": group("pos_embd"), "_POSITION_EMBEDDING_GLOBAL_RANKS": ranks("pos_embd"),
        "_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP": group("tp_dp_cp"),
        "_TENSOR_AND_DATA_PARALLEL_GROUP": group("tp_dp"),
        "_TENSOR_AND_CONTEXT_PARALLEL_GROUP": group("tp_cp"),
        "_EXPERT_MODEL_PARALLEL_GROUP": group("ep"), "_EXPERT_MODEL_PARALLEL_RANKS": ranks("ep"),
        "_EXPERT_TENSOR_PARALLEL_GROUP": group("expt_tp"),
        "_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP": group("tp_ep"),
        "_EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP": group("tp_ep_pp"),
        "_EXPERT_DATA_PARALLEL_GROUP": group("expt_dp"), "_EXPERT_DATA_PARALLEL_GROUP_GLOO": group("expt_dp_gloo"),
        "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP": group("expt_dp"),
        "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP_GLOO": group("expt_dp_gloo"),
        "_INTER_PARTIAL_EXPERT_DATA_PARALLEL_GROUP": None,
        "_INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP": group("intra_dist_opt"),
    }
    for name, value in values.items():
        if not hasattr(ps, name):  # a megatron-core without this global: refuse rather than half-install
            raise DistillError(f"megatron.core.parallel_state has no {name}; this megatron-core version is not "
                               "supported by teacher_parallel (tested with 0.16)")
        setattr(ps, name, value)
    ps._set_global_memory_buffer()
