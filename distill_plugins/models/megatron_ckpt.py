"""megatron-core distributed checkpoints of a GPTModel, loadable under a different TP/PP.

Design
------
Saving uses the model's ``sharded_state_dict()`` and
``megatron.core.dist_checkpointing.save``: every tensor is stored with its
global shape and each rank's offsets, so loading under another TP/PP is
megatron's resharding (``dist_checkpointing.load`` reads the overlapping parts
of the saved shards for each rank's ``sharded_state_dict()``). Beside the
weights, rank 0 writes ``distill_model.json``
(:mod:`distill_plugins.models.checkpoint_meta`): the :class:`ModelSpec`, the real
and padded vocabulary and the layout it was saved with. ``distill check``,
``distill plan`` and ``megatron:`` / ``checkpoint:`` model specs read only that
file to learn the model's shape.

One thing megatron does not reshard: the *padded* vocabulary depends on TP
(``ceil(V / (divisor * TP)) * divisor * TP``), so the embedding and output
layer can have a different global row count at load time. Then
:func:`load_megatron_checkpoint` loads those two tensors whole (each rank holds
the saved ``[V_padded_saved, h]`` tensor for a moment), keeps its own rows and
zeroes the padding. Every other tensor is read as this rank's slice only.

Accepted paths: a ``dist_checkpointing`` directory (``metadata.json`` +
``common.pt`` + ``*.distcp``), or a distill_plugins run checkpoint
(``step_N/``) that holds one in ``model_dist/``.

Limits: checkpoints written by Megatron-LM's ``pretrain_gpt.py`` have no
``distill_model.json``; write one by hand (format:
:class:`~distill_plugins.models.checkpoint_meta.CheckpointMeta`) to use them. The TE and local layer specs share the same sharded keys (megatron
maps the fused-norm names), so either can load the other's checkpoint.

Usage::

    save_megatron_checkpoint(model, "ckpt/teacher")            # collective
    ...                                                        # later, any TP/PP
    spec = checkpoint_meta.read_checkpoint_spec("ckpt/teacher")
    model = build.build_gpt_model(spec, parallel, cpu=True)
    load_megatron_checkpoint(model, "ckpt/teacher")            # collective
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from distill_plugins.checkpoint.integrity import verify_model_dist
from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.models.build import ensure_tp_attributes, model_layout
from distill_plugins.models.checkpoint_meta import CheckpointMeta, resolve_checkpoint_dir, write_meta_file

try:  # the module of megatron's async-writer results queue; its layout changed across megatron-core releases
    from megatron.core.dist_checkpointing.strategies import filesystem_async as _filesystem_async
except ImportError:  # pragma: no cover - layout of older megatron-core
    _filesystem_async = None

__all__ = ["save_megatron_checkpoint", "load_megatron_checkpoint", "write_checkpoint_meta",
           "in_process_results_queue"]

log = get_logger(__name__)

_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "distill_layout") and hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def in_process_results_queue():
    """Let a *synchronous* torch_dist save skip megatron's ``multiprocessing.Manager``.

    megatron's writer reports results through a queue made by a spawned Manager
    process (for its async mode). A synchronous save puts and gets in this
    process, so a plain queue does; starting the Manager costs seconds per
    process (a fresh interpreter importing torch). The original is restored.
    """
    fa = _filesystem_async
    if fa is None or getattr(fa, "_results_queue", "absent") is not None:
        yield
        return
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


def write_checkpoint_meta(model: torch.nn.Module, path: str, *, make_vocab_size_divisible_by: int,
                          precision: Optional[str] = None, family: Optional[str] = None) -> str:
    """Write ``distill_model.json`` (the model's shape, vocabulary and layout) into ``path``; one rank only.

    Called by :func:`save_megatron_checkpoint` and by the engine after each run
    checkpoint, so ``distill export`` and ``teacher: {megatron: ...}`` know the shape.
    """
    inner = _unwrap(model)
    layout = model_layout(inner)
    if precision is None:
        dtype = next(inner.parameters()).dtype
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    meta = CheckpointMeta(spec=dataclasses.replace(layout.spec, vocab_size=layout.vocab_size, hf=None,
                                                   megatron=None, checkpoint=None),
                          vocab_size=layout.vocab_size, padded_vocab_size=layout.padded_vocab_size,
                          make_vocab_size_divisible_by=make_vocab_size_divisible_by, tensor=layout.tp_size,
                          pipeline=layout.pp_size, precision=precision, family=family)
    return write_meta_file(meta, path)


def save_megatron_checkpoint(model: torch.nn.Module, path: str, *, make_vocab_size_divisible_by: int = 128,
                             precision: Optional[str] = None, family: Optional[str] = None) -> str:
    """Save ``model`` with ``dist_checkpointing`` plus ``distill_model.json``; call on every rank.

    Args:
        model: a model from :func:`distill_plugins.models.build.build_gpt_model`.
        path: target directory (created; must be empty or absent).
        make_vocab_size_divisible_by: the divisor the model was padded with (recorded).
        precision: recorded precision; default from the parameters' dtype.
        family: HF family to export to later (recorded).
    """
    inner = _unwrap(model)
    layout = model_layout(inner)
    rank0 = (not dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        os.makedirs(path, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    with in_process_results_queue():
        dist_checkpointing.save(inner.sharded_state_dict(), path, async_sharded_save=False)
    if rank0:
        write_checkpoint_meta(inner, path, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                              precision=precision, family=family)
    if dist.is_initialized():
        dist.barrier()
    return path


@torch.no_grad()
def load_megatron_checkpoint(model: torch.nn.Module, path: str, *, strict: bool = True) -> None:
    """Load a ``dist_checkpointing`` checkpoint into ``model`` under the current TP/PP; call on every rank.

    Raises:
        DistillError: not a checkpoint; a run checkpoint whose ``model_dist/`` files
            fail their recorded checksums; a tensor whose global shape differs from
            the model's (named, with both shapes) other than the vocabulary
            padding; or megatron's load failing (its message is kept).
    """
    ckpt_dir = resolve_checkpoint_dir(path)
    verify_model_dist(ckpt_dir)  # a run checkpoint's model_dist/ against its recorded checksums (collective)
    inner = _unwrap(model)
    layout = model_layout(inner)
    sharded = inner.sharded_state_dict()
    saved = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    whole: dict[str, int] = {}  # state-dict name -> saved padded rows, for vocab tensors loaded whole
    for name, sh in list(sharded.items()):
        if not isinstance(sh, ShardedTensor) or sh.key not in saved:
            continue
        got = tuple(saved[sh.key].global_shape)
        want = tuple(sh.global_shape)
        if got == want:
            continue
        if sh.key in _VOCAB_KEYS and got[1:] == want[1:] and got[0] >= layout.vocab_size:
            buf = torch.empty(got, dtype=sh.data.dtype)
            # every TP rank reads the whole tensor: only TP rank 0 may be the main replica
            replica = sh.replica_id
            replica = (replica[0], layout.tp_rank, *replica[2:]) if isinstance(replica, tuple) and len(replica) >= 2 \
                else (replica, layout.tp_rank) if layout.tp_rank else replica
            sharded[name] = ShardedTensor.from_rank_offsets(sh.key, buf, replica_id=replica)
            whole[name] = got[0]
            continue
        raise DistillError(f"{ckpt_dir}: tensor {sh.key!r} was saved with global shape {got} but the model "
                           f"expects {want}; the model spec does not match the checkpoint")
    missing = [sh.key for sh in sharded.values() if isinstance(sh, ShardedTensor) and sh.key not in saved]
    if missing:
        raise DistillError(f"{ckpt_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                           f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
    try:
        state = dist_checkpointing.load(sharded, ckpt_dir)
    except Exception as exc:  # megatron raises assorted types; keep its message
        raise DistillError(f"loading megatron checkpoint {ckpt_dir} failed: {type(exc).__name__}: {exc}") from exc
    params = dict(inner.named_parameters())
    for name in whole:
        full = state[name]
        local_rows = params[name].shape[0]
        start = layout.tp_rank * local_rows
        out = torch.zeros_like(params[name])
        stop = min(start + local_rows, layout.vocab_size)
        if stop > start:
            out[: stop - start] = full[start:stop]
        state[name] = out
        del full
    inner.load_state_dict(state, strict=strict)
    ensure_tp_attributes(inner)
    log.info("loaded megatron checkpoint %s (TP=%d, PP=%d)", ckpt_dir, layout.tp_size, layout.pp_size)
