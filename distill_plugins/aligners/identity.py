"""``identity``: teacher and student share one tokenizer; only the padding may differ.

Behaviour
---------
Megatron pads each model's vocabulary to a multiple of
``make_vocab_size_divisible_by x TP`` (:func:`padded_vocab_size`), and a teacher
imported from a checkpoint keeps the padding it was trained with, so the two
output layers can be of different widths while the real vocabularies agree.

The rule the engine follows:

1. Preferred: build both output layers with one padded size,
   :func:`common_padded_vocab_size` (the larger of the two; both are already
   multiples of TP). A loaded output layer narrower than that gets zero rows
   appended (:func:`pad_vocab_rows`). Then the logits shards cover the same ids
   on every rank and go to the objective unchanged, with
   ``vocab_size = real vocab`` masking the padding columns.
2. Fallback: :meth:`IdentityAligner.teacher_logits_like_student` drops the
   teacher's padding columns by laying its logits out like the student's shard
   (free at TP=1; one all-gather of the teacher's logits when TP > 1).

``check`` refuses different real vocabularies (and, when both tokenizer files
are known, different token -> id maps) at ``distill check`` time, naming both
sizes and suggesting a cross-tokenizer aligner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError
from ..interfaces import PartConfig
from ..parallel import group_size, vocab_shard_start
from ..recipe.schema import padded_vocab_size
from ._tp import gather_vocab
from .base import AlignerBase
from .vocab import load_tokenizer, same_vocabulary

__all__ = ["IdentityAligner", "padded_vocab_size", "common_padded_vocab_size", "pad_vocab_rows"]

CROSS_TOKENIZER_HINT = ("use a cross-tokenizer aligner instead: `aligner: {name: dskd, objective: forward_kl}` "
                        "(or eta, uld), with data.tokenizer and data.teacher_tokenizer set")


def common_padded_vocab_size(student_padded: int, teacher_padded: int, tensor_parallel: int = 1) -> int:
    """The padded size both output layers use under ``identity`` (the larger one).

    Raises:
        InputError: a size is not a multiple of ``tensor_parallel``.
    """
    for who, size in (("student", student_padded), ("teacher", teacher_padded)):
        if size % tensor_parallel:
            raise InputError(f"the {who}'s padded vocabulary {size} is not a multiple of tensor parallel "
                             f"size {tensor_parallel}")
    return max(student_padded, teacher_padded)


def pad_vocab_rows(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows to a full ``[V, d]`` output/embedding weight up to ``padded_size`` rows."""
    if weight.shape[0] > padded_size:
        raise InputError(f"output layer has {weight.shape[0]} rows, more than the padded size {padded_size}")
    if weight.shape[0] == padded_size:
        return weight
    pad = weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


class IdentityAligner(AlignerBase):
    """Same tokenizer on both sides; the engine's own loss glue compares the logits."""

    cross_tokenizer = False
    computes_loss = False
    needs_hidden_states = False

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def check(self, *, student_vocab_size: Optional[int], teacher_vocab_size: Optional[int],
              **info: Any) -> list[str]:
        """Errors when the real vocabularies (or the tokenizers' id maps) differ; None sizes are unknown."""
        if None not in (student_vocab_size, teacher_vocab_size) and student_vocab_size != teacher_vocab_size:
            return [f"aligner 'identity' needs one vocabulary, but the student's real vocabulary has "
                    f"{student_vocab_size} tokens and the teacher's has {teacher_vocab_size}; "
                    f"{CROSS_TOKENIZER_HINT}"]
        s_path, t_path = info.get("student_tokenizer"), info.get("teacher_tokenizer")
        if s_path and t_path and os.path.realpath(s_path) != os.path.realpath(t_path) \
                and all(str(p).startswith("embedded:") or os.path.exists(p) for p in (s_path, t_path)):
            try:
                same = same_vocabulary(load_tokenizer(s_path), load_tokenizer(t_path))
            except Exception as exc:  # reported, not raised: check gathers every error
                return [f"aligner 'identity': cannot load the tokenizers to compare them: {exc}"]
            if not same:
                return [f"aligner 'identity': the student tokenizer {s_path!r} and the teacher tokenizer "
                        f"{t_path!r} both have {student_vocab_size} tokens but map token strings to different "
                        f"ids; {CROSS_TOKENIZER_HINT}"]
        return []

    def teacher_logits_like_student(self, teacher_logits: torch.Tensor, student_v_local: int, tp_group: Any = None,
                                    vocab_size: Optional[int] = None) -> torch.Tensor:
        """Teacher logits ``[N, Vt_local]`` laid out like the student's shard ``[N, Vs_local]``.

        Identity when the shard widths agree. Otherwise the teacher's padding
        columns are dropped (and zero columns added where the student pads
        more): the result covers the student's global ids
        ``[rank*Vs_local, (rank+1)*Vs_local)``. Pass ``vocab_size`` (the real
        vocabulary) to the objective so every padding column is masked.
        """
        vt_local = teacher_logits.shape[-1]
        if vt_local == student_v_local:
            return teacher_logits
        if vocab_size is not None and vocab_size > min(vt_local, student_v_local) * group_size(tp_group):
            raise InputError(f"real vocabulary {vocab_size} exceeds a padded vocabulary "
                             f"({vt_local} or {student_v_local} per rank x TP {group_size(tp_group)})")
        full = gather_vocab(teacher_logits.detach(), tp_group)
        start = vocab_shard_start(student_v_local, tp_group)
        out = full[..., start:start + student_v_local]
        if out.shape[-1] < student_v_local:
            out = torch.cat([out, out.new_zeros(*out.shape[:-1], student_v_local - out.shape[-1])], dim=-1)
        return out
