"""What ``distill check`` reports about a model, read from config files only.

Design
------
:func:`describe_model` resolves a :class:`~distill_plugins.recipe.schema.ModelSpec`
with :func:`distill_plugins.models.resolve.resolve_model` (``hf:`` -> ``config.json``
through the one HF-config parser; ``megatron:`` / ``checkpoint:`` ->
``distill_model.json``; inline specs as written) into a :class:`ModelInfo`: family, architecture, shape,
parameter count (computed from the shapes, in the Hugging Face convention: real
vocabulary, tied embeddings counted once) and the padded vocabulary megatron
will use under the recipe's ``parallel`` section. No weights are read and no
megatron import happens, so it is cheap enough for ``distill check``.

Usage::

    info = describe_model(recipe.teacher, recipe.parallel, role="teacher")
    print(info.summary())
    # teacher: llama (hf:/models/llama-7b) 32 layers, hidden 4096, 32 heads / 32 kv, ffn 11008,
    #          6.74B parameters, vocab 32000 -> padded 32000 (TP=1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from distill_plugins.models.resolve import resolve_model
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec, padded_vocab_size
from distill_plugins import shapes
from distill_plugins.shapes import TransformerShape, ffn_hidden_size, shape_keys

__all__ = ["ModelInfo", "describe_model", "count_parameters", "vocab_mismatch_error"]


@dataclass(frozen=True)
class ModelInfo:
    """A model's shape as ``distill check`` shows it.

    Attributes:
        role: recipe section (``student``, ``teacher``, ``reference``).
        source: ``hf:<dir>``, ``megatron:<dir>``, ``checkpoint:<dir>`` or ``inline``.
        family: ``llama``, ``mistral``, ``qwen2``, ``gpt2`` (inline: ``llama``/``gpt2``).
        spec: the resolved spec (shape keys filled from the config file).
        vocab_size: real vocabulary (``None`` when the tokenizer decides later).
        padded_vocab_size: rows megatron allocates (``None`` with an unknown vocabulary).
        num_parameters: parameter count (real vocabulary; ``None`` with an unknown vocabulary).
        tensor: the TP size the padding was computed for.
    """

    role: str
    source: str
    family: str
    spec: ModelSpec
    vocab_size: Optional[int]
    padded_vocab_size: Optional[int]
    num_parameters: Optional[int]
    tensor: int

    def summary(self) -> str:
        s = self.spec
        groups = s.num_query_groups or s.num_attention_heads
        params = "? parameters (vocabulary unknown)" if self.num_parameters is None else \
            f"{_human(self.num_parameters)} parameters"
        vocab = "vocab from the tokenizer" if self.vocab_size is None else \
            f"vocab {self.vocab_size} -> padded {self.padded_vocab_size} (TP={self.tensor})"
        return (f"{self.role}: {self.family} ({self.source}) {s.num_layers} layers, hidden {s.hidden_size}, "
                f"{s.num_attention_heads} heads / {groups} kv, ffn {ffn_hidden_size(s)}, {params}, {vocab}"
                + (", tied embeddings" if s.tie_embeddings else ""))


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def count_parameters(spec: ModelSpec, vocab_size: int) -> int:
    """Parameters of ``spec`` with ``vocab_size`` real rows (tied embeddings counted once; :func:`shapes.count_parameters`)."""
    return shapes.count_parameters(TransformerShape(**shape_keys(spec, vocab_size)), spec.arch)


def describe_model(spec: ModelSpec, parallel: ParallelSpec, *, role: str = "model",
                   vocab_size: Optional[int] = None) -> ModelInfo:
    """Resolve ``spec`` from its config file (if any) and describe it.

    Args:
        spec: a recipe model section.
        parallel: the recipe's parallel section (TP and the padding divisor).
        role: section name for messages.
        vocab_size: the tokenizer's vocabulary, used when the spec has none.

    Raises:
        DistillError: unreadable or unsupported config (message names the file).
    """
    model = resolve_model(spec)
    resolved, family, source = model.spec, model.family, model.source
    vocab = resolved.vocab_size if resolved.vocab_size is not None else vocab_size
    if vocab is not None and resolved.vocab_size is None:
        resolved = dataclasses.replace(resolved, vocab_size=vocab)
    padded = None
    params = None
    if vocab is not None:
        padded = padded_vocab_size(vocab, parallel.make_vocab_size_divisible_by, parallel.tensor)
        params = count_parameters(resolved, vocab)
    return ModelInfo(role=role, source=source, family=family, spec=resolved, vocab_size=vocab,
                     padded_vocab_size=padded, num_parameters=params, tensor=parallel.tensor)


def vocab_mismatch_error(student: ModelInfo, teacher: ModelInfo, aligner: str) -> Optional[str]:
    """An error message when the vocabularies differ and ``aligner`` cannot bridge them, else ``None``.

    ``identity`` (and ``auto`` without a cross-tokenizer aligner chosen) need
    equal vocabularies.
    """
    if student.vocab_size is None or teacher.vocab_size is None or student.vocab_size == teacher.vocab_size:
        return None
    if aligner in ("identity", "auto"):
        return (f"student vocab_size={student.vocab_size} differs from {teacher.role} vocab_size="
                f"{teacher.vocab_size} ({teacher.source}) and aligner={aligner!r} needs equal vocabularies; "
                "use the teacher's tokenizer for the student, or set a cross-tokenizer aligner and "
                "data.teacher_tokenizer")
    return None
