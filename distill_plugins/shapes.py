"""The resolved shape of a decoder-only transformer, shared by the planner and the Hugging Face import.

Design
------
A recipe's :class:`~distill_plugins.recipe.schema.ModelSpec` leaves some shape
keys open (``ffn_hidden_size``, ``num_query_groups``, ``vocab_size``: null means
"the default" or "the tokenizer's"). :class:`TransformerShape` is the same shape
with every key settled, the record that parameter counts and the checkpoint
mapping need. Two records extend it:

* :class:`distill_plugins.plan.ModelShape` adds the recipe role and where the
  shape came from (``distill plan``);
* :class:`distill_plugins.models.hf_config.HFArchitecture` adds the HF family
  and the settings the conversion needs (RoPE base, epsilon, dtype, ...).

Parameter counts live here too, in one place: :func:`layer_params` and friends
split each part into tensor-parallel-sharded and replicated parameters (the
planner's per-GPU memory), :func:`count_parameters` adds them up (the planner's
model lines and ``distill check``'s summary, HF convention: real vocabulary, tied
embeddings once). The formulas are written out in docs/planner.md.

Pure Python, no torch: ``distill plan`` imports it on a laptop.

Usage::

    keys = shape_keys(spec, vocab_size=32000)   # the TransformerShape fields of a ModelSpec
    shape = TransformerShape(**keys)
    count_parameters(shape, spec.arch)          # e.g. 8_030_261_248 for Llama-3.1-8B
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill_plugins.recipe.schema import ModelSpec

__all__ = ["TransformerShape", "Params", "count_parameters", "default_ffn_hidden_size", "embedding_params",
           "ffn_hidden_size", "final_norm_params", "layer_params", "output_params", "shape_keys"]


@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """Every shape key of a decoder-only transformer, resolved.

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width ``h``.
        ffn_hidden_size: MLP width ``f``.
        num_attention_heads: attention heads ``a``.
        num_query_groups: key/value heads (GQA groups); ``a`` without GQA.
        vocab_size: real vocabulary (embedding rows before megatron's padding).
        max_position_embeddings: longest sequence the model accepts.
        tie_embeddings: the output layer shares the input embedding.
        add_qkv_bias: biases on the q/k/v projections (Qwen2; GPT-2 has all biases).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool = False
    add_qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        """``h / a`` (the key/value channels of one head)."""
        return self.hidden_size // self.num_attention_heads


def default_ffn_hidden_size(arch: str, hidden_size: int) -> int:
    """4h for gpt2; 8h/3 rounded up to a multiple of 64 for llama (the schema's default)."""
    if arch == "gpt2":
        return 4 * hidden_size
    return -(-(8 * hidden_size // 3) // 64) * 64


def ffn_hidden_size(spec: ModelSpec) -> int:
    """``spec.ffn_hidden_size``, else :func:`default_ffn_hidden_size` of its arch and width."""
    if spec.ffn_hidden_size is not None:
        return spec.ffn_hidden_size
    return default_ffn_hidden_size(spec.arch, spec.hidden_size)


def shape_keys(spec: ModelSpec, vocab_size: Optional[int] = None) -> dict[str, Any]:
    """The :class:`TransformerShape` fields of ``spec``, its open keys settled.

    ``vocab_size`` replaces ``spec.vocab_size`` when given; ``num_query_groups``
    defaults to the head count and gpt2 always has q/k/v biases.
    """
    return dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=ffn_hidden_size(spec),
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups or spec.num_attention_heads,
        vocab_size=spec.vocab_size if vocab_size is None else vocab_size,
        max_position_embeddings=spec.max_position_embeddings, tie_embeddings=spec.tie_embeddings,
        add_qkv_bias=spec.add_qkv_bias or spec.arch == "gpt2",
    )


# ---------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """A parameter count split into tensor-parallel-sharded and replicated parts."""

    sharded: int = 0
    replicated: int = 0

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_gpu(self, tensor: int) -> int:
        return self.sharded // tensor + self.replicated

    def __add__(self, other: "Params") -> "Params":
        return Params(self.sharded + other.sharded, self.replicated + other.replicated)

    def __mul__(self, n: int) -> "Params":
        return Params(self.sharded * n, self.replicated * n)


def layer_params(shape: TransformerShape, arch: str) -> Params:
    """One transformer layer.

    llama: QKV ``h (h + 2 g k)`` (+ ``h + 2 g k`` bias when add_qkv_bias), k = h/a;
    output projection ``h^2``; SwiGLU ``3 h f``; two RMSNorm weights ``2 h``.
    gpt2: QKV ``3h^2 + 3h``; projection ``h^2 + h``; MLP ``2 h f + f + h``; two LayerNorms ``4h``.
    Column-parallel biases are sharded, row-parallel biases and norms replicated.
    """
    h, f = shape.hidden_size, shape.ffn_hidden_size
    if arch == "gpt2":
        sharded = 3 * h * h + 3 * h + h * h + h * f + f + f * h
        return Params(sharded=sharded, replicated=h + h + 4 * h)
    qkv_out = h + 2 * shape.num_query_groups * shape.head_dim
    sharded = h * qkv_out + h * h + 3 * h * f + (qkv_out if shape.add_qkv_bias else 0)
    return Params(sharded=sharded, replicated=2 * h)


def embedding_params(shape: TransformerShape, arch: str, vocab: int) -> Params:
    """Word embedding ``V h`` (vocab-parallel); gpt2 adds learned positions ``max_pos h`` (replicated)."""
    positions = shape.max_position_embeddings * shape.hidden_size if arch == "gpt2" else 0
    return Params(sharded=vocab * shape.hidden_size, replicated=positions)


def final_norm_params(shape: TransformerShape, arch: str) -> Params:
    """The final norm: RMSNorm weight ``h`` (llama), LayerNorm weight and bias ``2h`` (gpt2); replicated."""
    return Params(replicated=(2 if arch == "gpt2" else 1) * shape.hidden_size)


def output_params(shape: TransformerShape, vocab: int) -> Params:
    """The output layer ``V h`` (vocab-parallel), when not tied to the embedding."""
    return Params(sharded=vocab * shape.hidden_size)


def count_parameters(shape: TransformerShape, arch: str, vocab: Optional[int] = None) -> int:
    """All parameters of the model with ``vocab`` rows (default ``shape.vocab_size``; output layer once when tied)."""
    vocab = shape.vocab_size if vocab is None else vocab
    total = embedding_params(shape, arch, vocab) + layer_params(shape, arch) * shape.num_layers \
        + final_norm_params(shape, arch)
    if not shape.tie_embeddings:
        total = total + output_params(shape, vocab)
    return total.total
