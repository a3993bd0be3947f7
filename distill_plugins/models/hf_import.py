"""Import a local Hugging Face checkpoint into a megatron-core GPTModel, reading only this rank's slices.

Design
------
Three modules, each usable on its own:

1. **Config** (:mod:`distill_plugins.models.hf_config`): ``config.json`` ->
   :class:`~distill_plugins.models.hf_config.HFArchitecture` (family, shapes, every
   rule of the conversion); the same parser serves ``distill plan`` and ``distill check``.
2. **Mapping** (:mod:`distill_plugins.models.hf_mapping`): which ranges of which HF
   tensors make up each megatron tensor along its partition dimension.
3. **Reading** (this module: :class:`HFCheckpoint`, :func:`load_hf_weights`): a TP
   rank owns one contiguous range of the full partition dimension (two for the gated
   ``fc1``: its share of gate and of up). Only the pieces intersecting that range are
   read, with ``safetensors``' ``get_slice``, so a rank never holds a whole tensor it
   only owns part of, and a pipeline stage reads only its own layers. Files are
   opened per tensor and closed straight after, so the pages a read maps are
   released before the next one. :attr:`HFCheckpoint.bytes_read` counts the bytes of
   every slice read (the memory test checks it).

``safetensors`` comes with the ``hf`` extra (``pip install 'distill-plugins[hf]'``);
it is imported when a checkpoint is opened, and its absence is a
:class:`~distill_plugins.errors.DistillError` that says so.

Usage::

    arch = read_hf_config("path/to/hf_dir")
    spec = arch.to_model_spec()                        # or models.resolve.resolve_model_spec(ModelSpec(hf=...))
    model = build.build_gpt_model(spec, parallel, cpu=True)
    report = load_hf_weights(model, "path/to/hf_dir")  # this rank's slices only
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.models.build import (build_gpt_model, canonical_name, ensure_tp_attributes, full_param_name,
                                          model_layout)
from distill_plugins.models.hf_config import HFArchitecture, read_hf_config
from distill_plugins.models.hf_mapping import Piece, hf_tensor_shapes, local_ranges, partition_dim, tensor_pieces
from distill_plugins.recipe.schema import ModelSpec
from distill_plugins.shapes import ffn_hidden_size

__all__ = [
    "HFCheckpoint",
    "ImportReport",
    "read_local",
    "load_hf_weights",
    "import_hf_model",
    "checkpoint_size",
]

log = get_logger(__name__)

_SHARD_INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SINGLE_FILE = "model.safetensors"


def _safe_open():
    """``safetensors.safe_open``, or an error naming the extra that installs it."""
    try:
        # optional extra [hf]: only an hf: import reads safetensors, so the package imports without it
        from safetensors import safe_open
    except ImportError as exc:
        raise DistillError("reading a Hugging Face checkpoint needs safetensors: "
                           "pip install 'distill-plugins[hf]'") from exc
    return safe_open


def read_local(pieces: list[Piece], ranges: Iterable[tuple[int, int]], dim: int, other_shape: tuple[int, ...],
               read: Callable[[Piece, int, int], torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Assemble the entries ``ranges`` of a full tensor along ``dim`` from ``pieces``.

    Args:
        pieces: the full tensor's pieces along ``dim`` (:func:`tensor_pieces`).
        ranges: ``[start, stop)`` ranges of the full dimension, concatenated in order.
        dim: the megatron partition dimension.
        other_shape: the tensor's shape with ``dim`` removed (for zero padding).
        read: ``read(piece, start, stop)`` returns entries ``[start, stop)`` of the
            piece, already in megatron orientation (``[n, ...]`` along ``dim``).
        dtype: dtype of zero padding.
    """
    out = []
    for a, b in ranges:
        pos = 0
        for piece in pieces:
            lo, hi = max(a, pos), min(b, pos + piece.length)
            if lo < hi:
                if piece.hf_name is None:
                    shape = list(other_shape)
                    shape.insert(dim, hi - lo)
                    out.append(torch.zeros(shape, dtype=dtype))
                else:
                    out.append(read(piece, lo - pos, hi - pos))
            pos += piece.length
    if len(out) == 1:
        return out[0]
    return torch.cat([t.to(dtype) for t in out], dim=dim)


# ---------------------------------------------------------------------------
# Reading safetensors slices
# ---------------------------------------------------------------------------


class HFCheckpoint:
    """The safetensors files of an HF directory, read slice by slice.

    Handles ``model.safetensors`` and sharded ``model.safetensors.index.json``
    layouts. Construction reads only the index and the file headers.

    Attributes:
        path: the directory.
        bytes_read: total bytes of all slices read so far.
        tensors_read: number of slice reads.
    """

    def __init__(self, path: str):
        self.path = path
        self.bytes_read = 0
        self.tensors_read = 0
        index = os.path.join(path, _SHARD_INDEX)
        single = os.path.join(path, _SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise DistillError(f"{index} lists {len(missing)} shard file(s) that do not exist: "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                   "the download is incomplete — fetch the missing files")
        elif os.path.isfile(single):
            files, weight_map = [_SINGLE_FILE], None
        else:
            if any(n.endswith(".bin") for n in os.listdir(path)):
                raise DistillError(f"{path!r} holds PyTorch .bin weights only; convert them to safetensors "
                                   "(transformers: model.save_pretrained(dir, safe_serialization=True))")
            raise DistillError(f"{path!r} has neither {_SINGLE_FILE} nor {_SHARD_INDEX}")
        self._file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        safe_open = _safe_open()
        for fname in files:
            with safe_open(os.path.join(path, fname), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    self._file_of[key] = fname
                    self._meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._file_of:
                    raise DistillError(f"{index} maps {key!r} to {fname} but that file does not hold it")

    def names(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def read(self, name: str, axis: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of ``name`` along ``axis`` (whole tensor when both are None)."""
        index = [slice(None)] * len(self.shape(name)) if name in self._meta else []
        if index and not (start is None and stop is None):
            index[axis] = slice(start, stop)
        return self.read_box(name, tuple(index))

    def read_box(self, name: str, index: tuple) -> torch.Tensor:
        """``name[index]`` for a tuple of slices, read with ``get_slice`` (only those bytes are copied)."""
        if name not in self._meta:
            raise DistillError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        # Opened per read and closed at once: the pages the read mapped are released before the next.
        with _safe_open()(os.path.join(self.path, self._file_of[name]), framework="pt") as fh:
            sl = fh.get_slice(name)
            t = sl[index] if index else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t

    def copy_into(self, target: torch.Tensor, piece: "Piece", start: int, stop: int,
                  max_chunk_bytes: int = 4 * 2**20) -> None:
        """Copy entries ``[start, stop)`` of ``piece`` into ``target`` (megatron orientation), in chunks.

        Reads HF rows in blocks of at most ``max_chunk_bytes``, so no more than one
        block is in flight, whatever the tensor's size.

        Raises:
            DistillError: the HF region and ``target`` differ in shape.
        """
        shape = self.shape(piece.hf_name)
        box = [(0, n) for n in shape]
        box[piece.axis] = (piece.offset + start, piece.offset + stop)
        view = target.t() if piece.transpose else target
        region = tuple(b - a for a, b in box)
        if tuple(view.shape) != region:
            raise DistillError(f"{self.path}: {piece.hf_name} slice has shape {region} but the megatron "
                               f"destination has shape {tuple(view.shape)}")
        if len(shape) == 1:
            view.copy_(self.read_box(piece.hf_name, (slice(*box[0]),)))
            return
        (r0, r1), (c0, c1) = box
        row_bytes = max(1, (c1 - c0) * _DTYPE_BYTES.get(self._meta[piece.hf_name][0], 4))
        step = max(1, max_chunk_bytes // row_bytes)
        for r in range(r0, r1, step):
            e = min(r + step, r1)
            view[r - r0:e - r0].copy_(self.read_box(piece.hf_name, (slice(r, e), slice(c0, c1))))

    def check_shapes(self, expected: dict[str, tuple[int, ...]], names: Optional[Iterable[str]] = None) -> None:
        """Raise if a needed tensor is absent or its shape differs from ``expected``.

        Raises:
            DistillError: naming the tensor and both shapes (or the missing tensor).
        """
        for name in (names if names is not None else expected):
            if name not in self._meta:
                raise DistillError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                   "(config.json and the weights disagree)")
            got = self.shape(name)
            if tuple(got) != tuple(expected[name]):
                raise DistillError(f"{self.path}: tensor {name!r} has shape {tuple(got)} but config.json implies "
                                   f"{tuple(expected[name])}")


@dataclass
class ImportReport:
    """What :func:`load_hf_weights` did on this rank."""

    parameters: int = 0
    bytes_read: int = 0
    tensors_read: int = 0
    checkpoint_bytes: int = 0
    hf_tensors: list[str] = field(default_factory=list)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str, *, arch: Optional[HFArchitecture] = None,
                    checkpoint: Optional[HFCheckpoint] = None) -> ImportReport:
    """Copy this rank's TP/PP slices of an HF checkpoint into ``model``.

    Args:
        model: a model from :func:`distill_plugins.models.build.build_gpt_model`
            whose spec matches the checkpoint (see :meth:`HFArchitecture.to_model_spec`).
        path: the HF directory.
        arch: its architecture (default: :func:`read_hf_config`).
        checkpoint: an open :class:`HFCheckpoint` (default: opened here).

    Returns:
        An :class:`ImportReport` (bytes and tensors read by this rank).

    Raises:
        DistillError: missing shard file or tensor, shape mismatch (both shapes
            named), or a model whose shape differs from the checkpoint's.
    """
    arch = arch or read_hf_config(path)
    for note in arch.notes:
        log.warning("%s", note)
    ckpt = checkpoint or HFCheckpoint(path)
    if arch.family == "gpt2" and f"{arch.prefix}wte.weight" not in ckpt and "wte.weight" in ckpt:
        arch = dataclasses.replace(arch, prefix="")  # original OpenAI files: no "transformer." prefix
    inner = model
    while not hasattr(inner, "distill_layout") and hasattr(inner, "module"):
        inner = inner.module
    layout = model_layout(inner)
    spec = layout.spec
    for key, value in arch.spec_fields().items():
        if key in ("vocab_size",):
            continue
        mine = getattr(spec, key)
        if key == "ffn_hidden_size":
            mine = ffn_hidden_size(spec)
        if key == "num_query_groups":
            mine = mine or spec.num_attention_heads
        if mine != value:
            raise DistillError(f"model spec {key}={mine!r} differs from {path}/config.json ({value!r}); "
                               "build the model from read_hf_config(path).to_model_spec()")
    if layout.vocab_size != arch.vocab_size:
        raise DistillError(f"model vocab_size={layout.vocab_size} differs from {path}/config.json "
                           f"vocab_size={arch.vocab_size}")
    expected = hf_tensor_shapes(arch)
    tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(inner.config, "gated_linear_unit", False))
    tp_rank, tp_size = layout.tp_rank, layout.tp_size

    plans = []
    for name, param in inner.named_parameters():
        fname = full_param_name(name, layout, tied=tied)
        pieces = tensor_pieces(fname, arch, layout.padded_vocab_size)
        plans.append((name, param, fname, pieces))
    needed = sorted({p.hf_name for *_, pieces in plans for p in pieces if p.hf_name is not None})
    ckpt.check_shapes(expected, needed)

    report = ImportReport()
    before_bytes, before_n = ckpt.bytes_read, ckpt.tensors_read
    for name, param, fname, pieces in plans:
        dim = partition_dim(canonical_name(name))
        tp_param = dim is not None and tp_size > 1
        dim = dim or 0
        full_len = sum(p.length for p in pieces)
        if tp_param:
            is_fc1 = gated and canonical_name(name).endswith("mlp.linear_fc1.weight")
            ranges = local_ranges(full_len, tp_rank, tp_size, gated=is_fc1)
        else:
            ranges = [(0, full_len)]
        n_local = sum(b - a for a, b in ranges)
        if n_local != param.shape[dim]:
            raise DistillError(f"{fname}: the checkpoint gives TP rank {tp_rank} {n_local} entries along dim {dim} "
                               f"but megatron's parameter {name!r} has shape {tuple(param.shape)}")
        # Written straight into the parameter, piece by piece and in bounded chunks: no
        # intermediate copy of the local shard exists.
        dst = 0
        for a, b in ranges:
            pos = 0
            for piece in pieces:
                lo, hi = max(a, pos), min(b, pos + piece.length)
                if lo < hi:
                    target = param.narrow(dim, dst, hi - lo)
                    if piece.hf_name is None:
                        target.zero_()
                    else:
                        ckpt.copy_into(target, piece, lo - pos, hi - pos)
                    dst += hi - lo
                pos += piece.length
        report.parameters += param.numel()
    ensure_tp_attributes(inner)
    report.bytes_read = ckpt.bytes_read - before_bytes
    report.tensors_read = ckpt.tensors_read - before_n
    report.hf_tensors = needed
    report.checkpoint_bytes = checkpoint_size(path)
    log.info("imported %s: %d parameters on this rank, read %.1f MB of %.1f MB", path, report.parameters,
             report.bytes_read / 2**20, report.checkpoint_bytes / 2**20)
    return report


def checkpoint_size(path: str) -> int:
    """Bytes of all ``*.safetensors`` files in ``path``."""
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def import_hf_model(path: str, parallel, *, base: Optional[ModelSpec] = None, precision: str = "fp32",
                    cpu: bool = False, who: str = "teacher"):
    """Build this rank's stage of the model in ``path`` and load its slices.

    megatron's ``parallel_state`` must be initialised with ``parallel``'s sizes.

    Returns:
        ``(model, report)``: the GPTModel (``model.distill_layout`` set) and the
        :class:`ImportReport`.
    """
    arch = read_hf_config(path)
    spec = arch.to_model_spec(base)
    model = build_gpt_model(spec, parallel, vocab_size=arch.vocab_size, precision=precision, cpu=cpu, who=who,
                            config_overrides={"perform_initialization": False})
    report = load_hf_weights(model, path, arch=arch)
    return model, report
