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

Pure Python, no torch: ``distill plan`` imports it on a laptop.

Usage::

    keys = shape_keys(spec, vocab_size=32000)   # the TransformerShape fields of a ModelSpec
    shape = TransformerShape(**keys)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill_plugins.recipe.schema import ModelSpec

__all__ = ["TransformerShape", "default_ffn_hidden_size", "ffn_hidden_size", "shape_keys"]


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
