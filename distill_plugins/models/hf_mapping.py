"""Megatron <-> Hugging Face weight names and index ranges: pure arithmetic, no tensors.

Design
------
Every parameter of the *full* megatron model (names of
:mod:`distill_plugins.models.build`' full-weight convention: local spec, global
layer numbers, padded vocabulary) is described along its tensor-parallel
partition dimension (:func:`partition_dim`) as a list of :class:`Piece` s, each a
contiguous range of one HF tensor (or zero padding). For example with ``ng``
query groups of ``np/ng`` heads of size ``d``::

    linear_qkv.weight = for g in groups: [q_proj rows of g's heads; k_proj rows of g; v_proj rows of g]
    linear_fc1.weight = [gate_proj; up_proj]                 (SwiGLU; each half TP-sharded)
    word_embeddings   = [embed_tokens (V rows); zeros (V_padded - V rows)]
    GPT-2 c_attn      = Conv1D [h, 3h]: q/k/v are column ranges, transposed

The import (:mod:`distill_plugins.models.hf_import`) reads the pieces a TP rank
owns (:func:`local_ranges`); the export (:mod:`distill_plugins.models.hf_export`)
cuts full tensors into the same pieces, so import and export cannot disagree.
:func:`hf_tensor_shapes` lists every tensor a checkpoint of an architecture must
hold. Imports neither torch nor megatron-core.

Usage::

    pieces = tensor_pieces("decoder.layers.0.self_attention.linear_qkv.weight", arch, padded_vocab_size)
    ranges = local_ranges(sum(p.length for p in pieces), tp_rank, tp_size)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from distill_plugins.errors import DistillError
from distill_plugins.models.hf_config import HFArchitecture

__all__ = ["Piece", "hf_tensor_shapes", "tensor_pieces", "partition_dim", "local_ranges"]


@dataclass(frozen=True)
class Piece:
    """A contiguous run of ``length`` entries along a megatron tensor's partition dimension.

    Attributes:
        length: entries along the megatron partition dimension.
        hf_name: HF tensor it comes from; ``None`` for zero padding.
        axis: axis of the HF tensor that runs along the megatron partition dimension.
        offset: start of the run on that axis.
        transpose: the HF tensor is stored transposed (GPT-2 ``Conv1D``: ``[in, out]``).
    """

    length: int
    hf_name: Optional[str] = None
    axis: int = 0
    offset: int = 0
    transpose: bool = False


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_tensor_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of ``arch`` must hold (``lm_head`` only when untied)."""
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if arch.family == "gpt2":
        p = arch.prefix
        shapes.update({f"{p}wte.weight": (v, h), f"{p}wpe.weight": (arch.max_position_embeddings, h),
                       f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,)})
        for i in range(arch.num_layers):
            b = f"{p}h.{i}."
            shapes.update({
                b + "ln_1.weight": (h,), b + "ln_1.bias": (h,), b + "ln_2.weight": (h,), b + "ln_2.bias": (h,),
                b + "attn.c_attn.weight": (h, 3 * h), b + "attn.c_attn.bias": (3 * h,),
                b + "attn.c_proj.weight": (h, h), b + "attn.c_proj.bias": (h,),
                b + "mlp.c_fc.weight": (h, f), b + "mlp.c_fc.bias": (f,),
                b + "mlp.c_proj.weight": (f, h), b + "mlp.c_proj.bias": (h,),
            })
    else:
        shapes.update({"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)})
        for i in range(arch.num_layers):
            b = f"model.layers.{i}."
            shapes.update({
                b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,),
                b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
                b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q),
                b + "mlp.gate_proj.weight": (f, h), b + "mlp.up_proj.weight": (f, h),
                b + "mlp.down_proj.weight": (h, f),
            })
            if arch.add_qkv_bias:
                shapes.update({b + "self_attn.q_proj.bias": (q,), b + "self_attn.k_proj.bias": (kv,),
                               b + "self_attn.v_proj.bias": (kv,)})
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _qkv_pieces(arch: HFArchitecture, q: str, k: str, v: str, *, axis: int = 0, transpose: bool = False,
                k_offset: int = 0, v_offset: int = 0) -> list[Piece]:
    """Megatron's per-group interleaving ``[q heads of g; k of g; v of g]`` over HF q/k/v runs."""
    d = arch.head_dim
    per_group = arch.num_attention_heads // arch.num_query_groups
    out = []
    for g in range(arch.num_query_groups):
        out += [Piece(per_group * d, q, axis, g * per_group * d, transpose),
                Piece(d, k, axis, k_offset + g * d, transpose),
                Piece(d, v, axis, v_offset + g * d, transpose)]
    return out


def tensor_pieces(full_name: str, arch: HFArchitecture, padded_vocab_size: int) -> list[Piece]:
    """The :class:`Piece` s that make up full megatron tensor ``full_name`` along its partition dim.

    The partition dimension is megatron's: 0 for column-parallel weights and
    biases, embeddings and the output layer; 1 for row-parallel weights
    (``linear_proj``, ``linear_fc2``); 0 (the whole tensor) for replicated ones.

    Raises:
        DistillError: for a name the family does not have.
    """
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    vocab = lambda name: [Piece(v, name)] + ([Piece(padded_vocab_size - v)] if padded_vocab_size > v else [])
    gpt2 = arch.family == "gpt2"
    p = arch.prefix
    if full_name == "embedding.word_embeddings.weight":
        return vocab(f"{p}wte.weight" if gpt2 else "model.embed_tokens.weight")
    if full_name == "output_layer.weight":
        return vocab("lm_head.weight")
    if full_name == "embedding.position_embeddings.weight" and gpt2:
        return [Piece(arch.max_position_embeddings, f"{p}wpe.weight")]
    if full_name.startswith("decoder.final_layernorm."):
        leaf = full_name.rsplit(".", 1)[1]
        return [Piece(h, f"{p}ln_f.{leaf}" if gpt2 else f"model.norm.{leaf}")]
    m = _LAYER.match(full_name)
    if m is not None:
        i, rest = int(m.group(1)), m.group(2)
        pieces = (_gpt2_layer if gpt2 else _llama_layer)(arch, i, rest)
        if pieces is not None:
            return pieces
    raise DistillError(f"{arch.family} has no counterpart for megatron parameter {full_name!r}")


def _llama_layer(arch: HFArchitecture, i: int, rest: str) -> Optional[list[Piece]]:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    b = f"model.layers.{i}."
    a = b + "self_attn."
    if rest == "input_layernorm.weight":
        return [Piece(h, b + "input_layernorm.weight")]
    if rest == "pre_mlp_layernorm.weight":
        return [Piece(h, b + "post_attention_layernorm.weight")]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        leaf = rest.rsplit(".", 1)[1]
        if leaf == "bias" and not arch.add_qkv_bias:
            return None
        return _qkv_pieces(arch, f"{a}q_proj.{leaf}", f"{a}k_proj.{leaf}", f"{a}v_proj.{leaf}")
    if rest == "self_attention.linear_proj.weight":
        return [Piece(arch.num_attention_heads * arch.head_dim, a + "o_proj.weight", axis=1)]
    if rest == "mlp.linear_fc1.weight":
        return [Piece(f, b + "mlp.gate_proj.weight"), Piece(f, b + "mlp.up_proj.weight")]
    if rest == "mlp.linear_fc2.weight":
        return [Piece(f, b + "mlp.down_proj.weight", axis=1)]
    return None


def _gpt2_layer(arch: HFArchitecture, i: int, rest: str) -> Optional[list[Piece]]:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    b = f"{arch.prefix}h.{i}."
    simple = {
        "input_layernorm.weight": (h, "ln_1.weight"), "input_layernorm.bias": (h, "ln_1.bias"),
        "pre_mlp_layernorm.weight": (h, "ln_2.weight"), "pre_mlp_layernorm.bias": (h, "ln_2.bias"),
        "self_attention.linear_proj.bias": (h, "attn.c_proj.bias"),
        "mlp.linear_fc1.bias": (f, "mlp.c_fc.bias"), "mlp.linear_fc2.bias": (h, "mlp.c_proj.bias"),
    }
    if rest in simple:
        n, name = simple[rest]
        return [Piece(n, b + name)]
    qkv = b + "attn.c_attn."
    if rest == "self_attention.linear_qkv.weight":  # Conv1D [h, 3h]: q|k|v are column blocks
        return _qkv_pieces(arch, qkv + "weight", qkv + "weight", qkv + "weight", axis=1, transpose=True,
                           k_offset=h, v_offset=2 * h)
    if rest == "self_attention.linear_qkv.bias":
        return _qkv_pieces(arch, qkv + "bias", qkv + "bias", qkv + "bias", k_offset=h, v_offset=2 * h)
    # Conv1D weights are [in, out]; megatron's are [out, in].
    if rest == "self_attention.linear_proj.weight":  # row-parallel: partition dim 1 = HF axis 0
        return [Piece(h, b + "attn.c_proj.weight", axis=0, transpose=True)]
    if rest == "mlp.linear_fc1.weight":  # column-parallel: partition dim 0 = HF axis 1
        return [Piece(f, b + "mlp.c_fc.weight", axis=1, transpose=True)]
    if rest == "mlp.linear_fc2.weight":
        return [Piece(f, b + "mlp.c_proj.weight", axis=0, transpose=True)]
    return None


_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                    "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def partition_dim(name: str) -> Optional[int]:
    """Megatron's TP partition dimension of parameter ``name`` (local-spec name); ``None`` if replicated.

    Decided by name rather than by the ``partition_dim`` attribute, which megatron
    only sets when it initialises the weights.
    """
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def local_ranges(full_len: int, tp_rank: int, tp_size: int, *, gated: bool = False) -> list[tuple[int, int]]:
    """Ranges of the full partition dimension this TP rank holds.

    One contiguous block ``[r*n, (r+1)*n)``; a gated ``fc1`` (``[gate; up]``)
    holds its block of each half, in that order, as megatron shards them.
    """
    if gated:
        half = full_len // 2
        n = half // tp_size
        return [(tp_rank * n, (tp_rank + 1) * n), (half + tp_rank * n, half + (tp_rank + 1) * n)]
    n = full_len // tp_size
    return [(tp_rank * n, (tp_rank + 1) * n)]
