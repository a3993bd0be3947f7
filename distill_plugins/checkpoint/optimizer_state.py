"""The optimizer's part of a per-rank checkpoint, with or without megatron's distributed optimizer.

Design
------
A plain megatron optimizer's ``state_dict()`` holds everything. megatron's
``DistributedOptimizer`` shards the optimizer state over data-parallel ranks
and its ``state_dict()`` leaves the sharded tensors out; each rank's shard
(main parameters, Adam moments and step, in the buffers' own layout) comes
from ``get_parameter_state_dp_reshardable()`` without any gather, which suits
checkpoints written as one file per rank: resume needs the same TP/PP/DP
layout, as for every other part of the checkpoint.

Chained optimizers (megatron builds one per parameter kind) are saved as a
list, one entry per optimizer, in order.

Usage::

    state = optimizer_state_dict(optimizer)      # into rank_NNNNN.pt
    load_optimizer_state(optimizer, state)       # after the model weights are loaded
"""

from __future__ import annotations

from typing import Any

import torch

from distill_plugins.errors import DistillError

__all__ = ["optimizer_state_dict", "load_optimizer_state", "is_distributed"]


def _parts(optimizer: Any) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(optimizer: Any) -> bool:
    """Whether any part is megatron's ``DistributedOptimizer``."""
    return any(hasattr(o, "get_parameter_state_dp_reshardable") for o in _parts(optimizer))


def _with_padding_flags(param_state: dict) -> dict:
    """Mark every saved parameter entry as real (the loader filters on a ``padding`` flag)."""
    for key, by_dtype in param_state.items():
        if not isinstance(key, int):
            continue
        for buckets in by_dtype.values():
            for bucket in buckets:
                for entry in bucket:
                    entry.setdefault("padding", False)
    return param_state


def optimizer_state_dict(optimizer: Any) -> dict:
    """This rank's optimizer state: ``{"format": "distill-v1", "parts": [...]}``."""
    parts = []
    for opt in _parts(optimizer):
        entry = {"state": opt.state_dict()}
        if hasattr(opt, "get_parameter_state_dp_reshardable"):
            entry["param_state"] = _with_padding_flags(opt.get_parameter_state_dp_reshardable())
        parts.append(entry)
    return {"format": "distill-v1", "parts": parts}


def load_optimizer_state(optimizer: Any, state: dict) -> None:
    """Restore :func:`optimizer_state_dict` output (or a plain ``state_dict()`` of older checkpoints)."""
    if not isinstance(state, dict) or state.get("format") != "distill-v1":
        if is_distributed(optimizer):
            raise DistillError("this checkpoint has no distributed-optimizer state; resume it with "
                               "parallel.distributed_optimizer: false")
        optimizer.load_state_dict(state)
        return
    opts, parts = _parts(optimizer), state["parts"]
    if len(opts) != len(parts):
        raise DistillError(f"the checkpoint holds {len(parts)} optimizer(s), this run has {len(opts)}; resume "
                           "with the recipe the checkpoint was written with")
    for opt, entry in zip(opts, parts):
        has_shards = "param_state" in entry
        if has_shards != hasattr(opt, "get_parameter_state_dp_reshardable"):
            saved = "with" if has_shards else "without"
            raise DistillError(f"the checkpoint was written {saved} parallel.distributed_optimizer; resume with "
                               "the same setting")
        opt.load_state_dict(entry["state"])
        if has_shards:
            _unshare_step_counters(opt.optimizer)
            with torch.no_grad():  # the main weights are views of parameters that require grad
                opt.load_parameter_state_from_dp_reshardable(entry["param_state"])


def _unshare_step_counters(inner: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    megatron-core 0.16's ``DistributedOptimizer.load_state_dict`` gives all
    parameters one shared ``step`` tensor when torch's own Adam is used (no
    Apex/TE); torch's Adam then adds 1 to it once per parameter per step, and
    the bias correction after a resume is wrong. The per-parameter values are
    restored right after from the saved shards.
    """
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.clone()
