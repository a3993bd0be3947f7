"""Export a megatron-core GPTModel (e.g. the trained student) to a Hugging Face directory.

Design
------
The inverse of :mod:`distill_plugins.models.hf_import`, driven by the same
:func:`~distill_plugins.models.hf_mapping.tensor_pieces` mapping:

1. **Gather over TP** (:func:`gather_full_tensor`): each parameter's shards are
   all-gathered over the tensor-parallel group and joined along megatron's
   partition dimension (a gated ``fc1`` joins its gate halves and its up halves
   separately); vocabulary tensors drop their padding rows.
2. **Convert** (:func:`megatron_to_hf`, pure): full megatron tensors -> HF tensors,
   splitting the fused QKV per query group, the ``[gate; up]`` of SwiGLU, and
   transposing GPT-2's ``Conv1D`` weights.
3. **Write per pipeline stage**: the first TP rank of the first data-parallel
   replica of every stage writes its own ``model-0000s-of-0000P.safetensors``
   (``model.safetensors`` when PP=1), so no process ever holds more than its
   stage; after a barrier, global rank 0 writes ``model.safetensors.index.json``
   (from the files' headers), ``config.json`` and copies the tokenizer files.

``config.json`` carries ``bos_token_id``/``eos_token_id`` read from the tokenizer
(:func:`special_token_ids`, checked on every rank before anything is written, so
a tokenizer larger than the model fails on all ranks at once); without a
tokenizer they are written as ``null`` rather than left to ``transformers``'
per-family defaults (ids that may fall outside, or arbitrarily inside, the
vocabulary). Every file gets ordinary permissions (``0666`` minus the umask,
``0644`` under the usual ``022``), like ``transformers``' own ``save_pretrained``.

The directory needs a shared filesystem across the writing ranks (usual for
checkpoints). Every rank must call :func:`export_hf` (the gathers are
collective).

Usage::

    export_hf(student, "out/hf", tokenizer_dir="path/to/tokenizer")
    AutoModelForCausalLM.from_pretrained("out/hf")
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from distill_plugins.data.tokenizer import load_tokenizer
from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.models.build import build_gpt_model, full_param_name, model_layout
from distill_plugins.models.checkpoint_meta import read_checkpoint_meta
from distill_plugins.models.hf_config import HFArchitecture
from distill_plugins.models.hf_mapping import hf_tensor_shapes, partition_dim, tensor_pieces
from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint
from distill_plugins.recipe.schema import ParallelSpec

__all__ = ["TOKENIZER_FILES", "gather_full_tensor", "megatron_to_hf", "export_hf", "export_megatron_checkpoint",
           "special_token_ids"]

log = get_logger(__name__)

#: files copied from ``tokenizer_dir`` when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: beginning-of-sequence tokens looked up when the tokenizer's config names none, in order.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


def _named_token(tokenizer_dir: str, key: str) -> Optional[str]:
    """The token string ``tokenizer_config.json`` gives for ``key`` (``bos_token``), if any."""
    config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as fh:
            value = json.load(fh).get(key)
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_ids(tokenizer_dir: Optional[str], vocab_size: int) -> dict[str, Optional[int]]:
    """``{"bos_token_id", "eos_token_id"}`` for ``config.json``, from the tokenizer at ``tokenizer_dir``.

    ``eos`` is the tokenizer's end-of-document token (the one training data is
    cut with: ``tokenizer_config.json``'s ``eos_token``, else a known name such
    as ``<|endoftext|>`` or ``</s>``). ``bos`` is ``tokenizer_config.json``'s
    ``bos_token``, else a known name (``<s>``, ``<|begin_of_text|>``, ...), else
    the eos id, as GPT-2's byte-level BPE does. Without a tokenizer both are None.

    Args:
        tokenizer_dir: a tokenizer directory or ``tokenizer.json`` file, or None.
        vocab_size: the model's real vocabulary.

    Raises:
        DistillError: the tokenizer cannot be loaded, or has more token ids than
            the model's vocabulary (naming both sizes).
    """
    if not tokenizer_dir:
        return {"bos_token_id": None, "eos_token_id": None}
    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > vocab_size:
        raise DistillError(f"tokenizer {tokenizer_dir!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                           f"{vocab_size}: ids {vocab_size}..{tok.vocab_size - 1} have no embedding row; export with "
                           "the tokenizer the model was trained with")
    bos = None
    named = _named_token(tokenizer_dir, "bos_token") if os.path.isdir(tokenizer_dir) else None
    for token in ([named] if named else []) + list(_BOS_CANDIDATES):
        bos = tok.token_to_id(token)
        if bos is not None:
            break
    eos = int(tok.eos_id)
    return {"bos_token_id": int(bos) if bos is not None else eos, "eos_token_id": eos}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(path: str) -> None:
    """``0666`` minus the umask: safetensors writes its files ``0600``, which other users cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def gather_full_tensor(param: torch.Tensor, name: str, *, tp_group=None, tp_size: int = 1, vocab_size: Optional[int] = None,
                       gated: bool = False) -> torch.Tensor:
    """The full (TP-gathered, unpadded) tensor of local parameter ``name``.

    Collective over ``tp_group`` for tensor-parallel parameters; every TP rank
    gets the result.

    Args:
        param: this rank's shard.
        name: local-spec parameter name (decides the partition dimension).
        tp_group: tensor-parallel group (``None`` with ``tp_size == 1``).
        tp_size: its size.
        vocab_size: real vocabulary; vocabulary tensors are cut to it.
        gated: the model's MLP is gated (``fc1`` holds ``[gate; up]`` per rank).
    """
    t = param.detach()
    dim = partition_dim(name)
    if dim is not None and tp_size > 1:
        parts = [torch.empty_like(t) for _ in range(tp_size)]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        if gated and "linear_fc1" in name:
            halves = [p.chunk(2, dim=dim) for p in parts]
            t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
        else:
            t = torch.cat(parts, dim=dim)
    if vocab_size is not None and name.endswith(("word_embeddings.weight", "output_layer.weight")):
        t = t[:vocab_size]
    return t


def megatron_to_hf(full: dict[str, torch.Tensor], arch: HFArchitecture, *, dtype: Optional[torch.dtype] = None,
                   complete: bool = False) -> dict[str, torch.Tensor]:
    """Convert full megatron tensors (full-weight names) to HF tensors (pure).

    Args:
        full: full-weight name -> tensor (vocabulary tensors padded or not).
            ``output_layer.weight`` is ignored when ``arch.tie_embeddings``.
        arch: the target architecture.
        dtype: cast to this dtype (default: keep).
        complete: raise unless every HF tensor of ``arch`` was fully written
            (for a whole model rather than one pipeline stage).

    Returns:
        HF name -> tensor, for the HF tensors ``full`` covers.

    Raises:
        DistillError: a megatron tensor of the wrong shape, or (``complete``) a
            missing HF tensor.
    """
    shapes = hf_tensor_shapes(arch)
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, tuple[int, int]] = {}  # HF name -> (axis, entries written)
    for fname, tensor in full.items():
        if fname == "output_layer.weight" and arch.tie_embeddings:
            continue
        vocab = fname.endswith(("word_embeddings.weight", "output_layer.weight"))
        pieces = tensor_pieces(fname, arch, max(tensor.shape[0], arch.vocab_size) if vocab else arch.vocab_size)
        dim = partition_dim(fname) or 0
        total = sum(p.length for p in pieces)
        if tensor.dim() <= dim or tensor.shape[dim] != total:
            raise DistillError(f"{fname}: shape {tuple(tensor.shape)} does not fit {arch.family} "
                               f"(dim {dim} should be {total})")
        pos = 0
        for piece in pieces:
            if piece.hf_name is not None:
                chunk = tensor.narrow(dim, pos, piece.length)
                if piece.transpose:
                    chunk = chunk.t()
                if piece.hf_name not in out:
                    out[piece.hf_name] = torch.zeros(shapes[piece.hf_name], dtype=dtype or tensor.dtype)
                    filled[piece.hf_name] = (piece.axis, 0)
                region = out[piece.hf_name].narrow(piece.axis, piece.offset, piece.length)
                if region.shape != chunk.shape:
                    raise DistillError(f"{fname} -> {piece.hf_name}: megatron slice of shape {tuple(chunk.shape)} "
                                       f"does not fit the HF region of shape {tuple(region.shape)}")
                region.copy_(chunk)
                axis, n = filled[piece.hf_name]
                filled[piece.hf_name] = (axis, n + piece.length)
            pos += piece.length
    for name, (axis, n) in filled.items():
        if n != shapes[name][axis]:
            raise DistillError(f"{name}: only {n} of {shapes[name][axis]} entries were written from the megatron "
                               "tensors given")
    if complete:
        missing = sorted(set(shapes) - set(out))
        if missing:
            raise DistillError(f"export to {arch.family} lacks {len(missing)} tensor(s): {missing[:8]}")
    return out


def _groups(model_layout):
    """(tp_group, dp_rank) from megatron's parallel_state, or (None, 0) when it is not initialised."""
    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group(), ps.get_data_parallel_rank()
    if model_layout.tp_size > 1:
        raise DistillError("export_hf: TP > 1 needs megatron's parallel_state to be initialised")
    return None, 0


@torch.no_grad()
def export_hf(model: torch.nn.Module, out_dir: str, *, arch: Optional[HFArchitecture] = None,
              family: Optional[str] = None, tokenizer_dir: Optional[str] = None, dtype: Optional[str] = None,
              tp_group=None, dp_rank: Optional[int] = None) -> str:
    """Write ``model`` (every rank's shard) as a Hugging Face directory; call on every rank.

    Args:
        model: a model from :func:`distill_plugins.models.build.build_gpt_model`
            (DDP/Float16 wrappers are unwrapped).
        out_dir: target directory (created; existing weight files are replaced).
        arch: target architecture; default :meth:`HFArchitecture.from_model_spec`
            of the model's spec (``family`` picks mistral/llama/qwen2 explicitly).
        tokenizer_dir: a directory whose tokenizer files are copied alongside.
        dtype: ``float32``, ``bfloat16`` or ``float16``; default the model's.
        tp_group, dp_rank: default from megatron's ``parallel_state``.

    Returns:
        ``out_dir``.
    """
    # optional extra (hf): safetensors is needed only to write the files
    from safetensors.torch import save_file

    inner = model
    while not hasattr(inner, "distill_layout") and hasattr(inner, "module"):
        inner = inner.module
    layout = model_layout(inner)
    if arch is None:
        arch = HFArchitecture.from_model_spec(layout.spec, vocab_size=layout.vocab_size, family=family)
    if dtype is not None and dtype not in _DTYPES:
        raise DistillError(f"export dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    token_ids = special_token_ids(tokenizer_dir, arch.vocab_size)  # every rank, before any collective or write
    if tp_group is None or dp_rank is None:
        g, d = _groups(layout)
        tp_group = g if tp_group is None else tp_group
        dp_rank = d if dp_rank is None else dp_rank
    tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(inner.config, "gated_linear_unit", False))
    writer = layout.tp_rank == 0 and dp_rank == 0
    hf: dict[str, torch.Tensor] = {}
    torch_dtype = _DTYPES[dtype] if dtype else None
    param_dtype = None
    for name, param in inner.named_parameters():
        param_dtype = param.dtype
        full = gather_full_tensor(param, name, tp_group=tp_group, tp_size=layout.tp_size,
                                  vocab_size=layout.vocab_size, gated=gated)
        fname = full_param_name(name, layout, tied=False)
        if tied and fname == "output_layer.weight":
            continue  # the embedding (first stage) carries the shared weight
        if writer:
            hf.update(megatron_to_hf({fname: full}, arch, dtype=torch_dtype))
    if dtype is None:
        dtype = {v: k for k, v in _DTYPES.items()}.get(param_dtype, "float32")
    os.makedirs(out_dir, exist_ok=True)
    pp = layout.pp_size
    fname = "model.safetensors" if pp == 1 else f"model-{layout.pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    if writer:
        save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        _normal_permissions(os.path.join(out_dir, fname))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    rank0 = (not dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        _write_metadata(out_dir, arch, pp, dtype, tokenizer_dir, token_ids)
        log.info("exported %s model to %s", arch.family, out_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out_dir


def _write_metadata(out_dir: str, arch: HFArchitecture, pp: int, dtype: str, tokenizer_dir: Optional[str],
                    token_ids: dict[str, Optional[int]]) -> None:
    # optional extra (hf): safetensors is needed only to read the shard headers back
    from safetensors import safe_open

    if pp > 1:
        weight_map, total = {}, 0
        for s in range(pp):
            fname = f"model-{s + 1:05d}-of-{pp:05d}.safetensors"
            with safe_open(os.path.join(out_dir, fname), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    weight_map[key] = fname
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * torch.tensor([], dtype=_DTYPES[dtype]).element_size()
        missing = sorted(set(hf_tensor_shapes(arch)) - set(weight_map))
        if missing:
            raise DistillError(f"exported files lack {len(missing)} tensor(s): {missing[:8]}")
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh,
                      indent=2)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump({**arch.hf_config(dtype=dtype), **token_ids}, fh, indent=2)
    if token_ids["eos_token_id"] is None:
        log.warning("exported %s without a tokenizer: config.json has bos_token_id/eos_token_id null; pass "
                    "tokenizer_dir (distill export --tokenizer-dir) to write them", out_dir)
    if tokenizer_dir:
        copied = []
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied.append(name)
        if not copied and os.path.isfile(tokenizer_dir) and tokenizer_dir.endswith(".json"):
            shutil.copyfile(tokenizer_dir, os.path.join(out_dir, "tokenizer.json"))
            copied.append("tokenizer.json")
        if not copied:
            log.warning("tokenizer_dir=%s holds no tokenizer files (%s)", tokenizer_dir, ", ".join(TOKENIZER_FILES))


def export_megatron_checkpoint(checkpoint: str, out_dir: str, *, family: Optional[str] = None,
                               tokenizer_dir: Optional[str] = None, dtype: Optional[str] = None) -> str:
    """Export a megatron checkpoint saved by :func:`~distill_plugins.models.megatron_ckpt.save_megatron_checkpoint`.

    Runs in the current process group with the parallel sizes megatron's
    ``parallel_state`` was initialised with (any TP/PP: the checkpoint is
    resharded on load), builds the model from the checkpoint's
    ``distill_model.json``, loads it and calls :func:`export_hf`.
    """
    meta = read_checkpoint_meta(checkpoint)
    spec = meta.spec
    parallel = ParallelSpec(tensor=ps.get_tensor_model_parallel_world_size(),
                            pipeline=ps.get_pipeline_model_parallel_world_size(),
                            make_vocab_size_divisible_by=meta.make_vocab_size_divisible_by)
    model = build_gpt_model(spec, parallel, vocab_size=meta.vocab_size, precision=meta.precision,
                            cpu=not torch.cuda.is_available(), config_overrides={"perform_initialization": False})
    load_megatron_checkpoint(model, checkpoint)
    return export_hf(model, out_dir, family=family or meta.family, tokenizer_dir=tokenizer_dir, dtype=dtype)
