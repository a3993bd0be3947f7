"""Instruction data for cross-tokenizer aligners: both tokenizations of the rendered text, response masks aligned.

Design
------
The student side is exactly :mod:`distill_plugins.data.instruct`'s: the same
:class:`~distill_plugins.data.instruct.InstructSource` (rendered with the
*student's* template, truncated and counted the same way, the same sample
order), so the student's ``tokens``/``labels`` equal the single-tokenizer
path's. The teacher reads the **same text**: for the window the student kept,
from the end of the token before it (character ``c0``) to the end of its last
token (``c1``), the teacher encodes ``text[c0:]`` and keeps the tokens ending
by ``c1`` (at most ``s + 1``, ``s = data.seq_length``, the same for both models
since the pipeline sends one tensor shape). A teacher token is a response token
when its first character lies in a response span, as on the student side;
with the plain template an EOS id follows every response the student's window
kept, on both sides.

Alignment (``pairing``):

* ``eta``: :func:`~distill_plugins.aligners.eta.align_tokens` on ``text[c0:c1]``,
  then only pairs whose student **and** teacher targets are response tokens
  are kept: the response mask mapped through the alignment. Special tokens the
  template writes as text (``<|im_start|>``) count as the text they stand for,
  so tokens after them still align (the aligner's own convention treats
  specials as covering no text, which fits only EOS appended after the text);
* ``position`` (ULD): the ``k``-th response target of the student with the
  ``k``-th response target of the teacher.

Batch: every key of :mod:`distill_plugins.data.instruct`'s batch (``tokens`` =
``student_tokens``, ``labels`` = ``student_labels``, ``prompt_tokens`` ... of
the student) plus the :class:`~distill_plugins.data.alignment_collate.AlignmentCollator`
keys: ``student_label_offsets``, ``teacher_tokens``, ``teacher_labels``,
``teacher_label_offsets`` (character spans in ``text[c0:c1]``),
``align_teacher_pos``, ``aligned_mask``, ``num_student_targets`` (student
response targets) and ``num_aligned``. Batches prefetch in a thread like the
text path's; the state is ``consumed_samples`` with ``stream: "instruct"`` (the
sample order is the single-tokenizer path's).

Usage (``text_batches.build_aligned_data`` dispatches here for ``data.kind: instruct``)::

    pair = text_batches.load_tokenizer_pair(recipe)
    train = build_instruct_aligned_data(recipe, tokenizers=pair, dp_rank=r, dp_size=dp, pairing="eta")
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..aligners.eta import align_tokens
from ..errors import InputError
from .alignment_collate import AlignmentCollator
from .instruct import InstructSource, collate_instruct, instruct_source
from .stream import PrefetchingIterator

__all__ = ["InstructAlignedCollator", "InstructAlignedIterator", "InstructAlignedEvalData",
           "build_instruct_aligned_data", "build_instruct_aligned_eval_data"]


def _text_byte_lengths(side) -> Optional[np.ndarray]:
    """The side's byte-length table with special tokens counted as the text they are written as."""
    if side.byte_lengths is None:
        return None
    table = side.byte_lengths.copy()
    for tid, added in side.backend.get_added_tokens_decoder().items():
        if tid < table.size:
            table[tid] = len(added.content.encode("utf-8"))
    return table


class InstructAlignedCollator:
    """Builds the aligned instruction batch of a list of global sample indices (module docstring).

    Args:
        source: the student's :class:`InstructSource` (built with ``collator.student``'s tokenizer).
        collator: an :class:`AlignmentCollator` for the tokenizer pair (its
            sides, sequence lengths and ``pairing`` are used).
    """

    def __init__(self, source: InstructSource, collator: AlignmentCollator):
        self.source, self.sides = source, collator
        self.student, self.teacher, self.pairing = collator.student, collator.teacher, collator.pairing
        self._lengths = {"student": _text_byte_lengths(self.student), "teacher": _text_byte_lengths(self.teacher)}

    def _teacher_row(self, text: str, spans, eos_at: Sequence[int], cut: int):
        """Teacher ids, offsets and response flags of ``text`` (already starting at ``c0``), tokens ending by ``cut``."""
        side = self.teacher
        enc = side.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        keep = int(np.searchsorted(np.maximum.accumulate(off[:, 1]), cut, side="right")) if ids.size else 0
        ids, off = ids[:keep], off[:keep]
        starts = off[:, 0]
        resp = np.zeros(ids.size, dtype=bool)
        for a, b in spans:
            resp |= (starts >= a) & (starts < b)
        if eos_at:
            if side.eos_id is None:
                raise InputError("the teacher tokenizer has no end-of-document token to close responses with; "
                                 "use a chat template or a teacher tokenizer with an EOS token")
            where = [int(np.searchsorted(off[:, 1], e, side="right")) for e in eos_at]
            ids = np.insert(ids, where, side.eos_id)
            off = np.insert(off, where, np.stack([eos_at, eos_at], axis=1), axis=0)
            resp = np.insert(resp, where, True)
        limit = side.seq_length + 1
        return ids[:limit], off[:limit], resp[:limit]

    def __call__(self, sample_ids: Sequence[int]) -> dict[str, Any]:
        src = self.source
        batch = collate_instruct(src, sample_ids)
        b, ls, lt = len(sample_ids), self.student.seq_length, self.teacher.seq_length
        s_offsets = np.full((b, ls, 2), -1, np.int64)
        t_tokens = np.full((b, lt), self.teacher.eos_id if self.teacher.eos_id is not None else 0, np.int64)
        t_labels = np.full((b, lt), -100, np.int64)
        t_offsets = np.full((b, lt, 2), -1, np.int64)
        pos = np.full((b, ls), -1, np.int64)
        for row, i in enumerate(sample_ids):
            k = src.example_index(i)
            ex, lo = src.examples[k], src.starts[k]
            s_ids, s_resp = src.ids[k], src.response[k]
            hi = lo + len(s_ids)
            c0 = 0 if lo == 0 else int(ex.offsets[lo - 1, 1])
            s_off = ex.offsets[lo:hi] - c0
            cut = int(s_off[:, 1].max()) if len(s_off) else 0
            text = ex.text[c0:]
            spans = [(a - c0, e - c0) for a, e in ex.spans]
            eos_at = []
            if ex.eos_after_response:  # the plain template: EOS after each response the student's window kept
                student_eos = (s_ids == self.student.eos_id) & s_resp & (s_off[:, 0] == s_off[:, 1])
                eos_at = [int(e) for e in s_off[student_eos, 1]]
            t_ids, t_off, t_resp = self._teacher_row(text, spans, eos_at, cut)
            n_s, n_t = len(s_ids), len(t_ids)
            s_offsets[row, :n_s - 1] = s_off[1:]
            t_tokens[row, :min(n_t, lt)] = t_ids[:lt]
            t_labels[row, :max(n_t - 1, 0)] = np.where(t_resp[1:], t_ids[1:], -100)
            t_offsets[row, :max(n_t - 1, 0)] = t_off[1:]
            s_targets = np.nonzero(s_resp[1:])[0]  # positions whose label is a response token
            t_targets = np.nonzero(t_resp[1:])[0]
            if self.pairing == "eta":
                plain = ex.eos_after_response
                al = align_tokens(
                    text[:cut], s_ids, s_off, t_ids, t_off,
                    student_byte_lengths=self.student.byte_lengths if plain else self._lengths["student"],
                    teacher_byte_lengths=self.teacher.byte_lengths if plain else self._lengths["teacher"],
                    student_special_ids=self.student.special_ids if plain else (),
                    teacher_special_ids=self.teacher.special_ids if plain else (),
                    student_eos_id=self.student.eos_id if plain else None,
                    teacher_eos_id=self.teacher.eos_id if plain else None)
                both = s_resp[al.student_pos + 1] & t_resp[al.teacher_pos + 1]
                s_pos, t_pos = al.student_pos[both], al.teacher_pos[both]
            else:
                m = min(s_targets.size, t_targets.size)
                s_pos, t_pos = s_targets[:m], t_targets[:m]
            pos[row, s_pos] = t_pos
        out = dict(batch)
        labels = batch["labels"]
        out.update(student_tokens=batch["tokens"], student_labels=labels,
                   student_label_offsets=torch.from_numpy(s_offsets), teacher_tokens=torch.from_numpy(t_tokens),
                   teacher_labels=torch.from_numpy(t_labels), teacher_label_offsets=torch.from_numpy(t_offsets),
                   align_teacher_pos=torch.from_numpy(pos))
        out["aligned_mask"] = out["align_teacher_pos"] >= 0
        out["num_student_targets"] = (labels != -100).sum()
        out["num_aligned"] = out["aligned_mask"].sum()
        return out


class InstructAlignedIterator(PrefetchingIterator):
    """One DP rank's aligned instruction microbatches (prefetched); state ``stream: "instruct"``.

    Args:
        collator: the :class:`InstructAlignedCollator`.
        **kw: :class:`~distill_plugins.data.stream.PrefetchingIterator` arguments
            (``micro_batch_size``, ``dp_rank``, ``dp_size``, ``consumed_samples``, ...).
    """

    stream = "instruct"

    def __init__(self, collator: InstructAlignedCollator, **kw: Any):
        super().__init__(seq_length=collator.student.seq_length, **kw)
        self.collator = collator

    def _build(self, first: int) -> dict[str, Any]:
        return self.collator(range(first, first + self.micro_batch_size))

    @property
    def stats(self) -> dict:
        """The split's counters (:attr:`InstructSource.stats`, student side)."""
        return dict(self.collator.source.stats)


class InstructAlignedEvalData:
    """A re-iterable held-out set of aligned instruction microbatches (see :class:`~.instruct.InstructEvalData`)."""

    def __init__(self, collator: InstructAlignedCollator, *, num_microbatches: int, **kw):
        self.collator, self.num_microbatches, self._kw = collator, num_microbatches, kw
        self.num_examples = collator.source.num_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return InstructAlignedIterator(self.collator, consumed_samples=0, max_microbatches=self.num_microbatches,
                                       **self._kw)

    def __len__(self) -> int:
        return self.num_microbatches


def _collator(recipe, split: str, pairing: str, tokenizers: tuple) -> InstructAlignedCollator:
    student, teacher = tokenizers
    s = recipe.data.seq_length
    sides = AlignmentCollator(student, teacher, seq_length=s, teacher_seq_length=s, pairing=pairing)
    # after the collator: it switches the tokenizers to untrimmed offsets, which the source must see too
    source = instruct_source(recipe, split, tokenizer=student)
    return InstructAlignedCollator(source, sides)


def build_instruct_aligned_data(recipe, *, tokenizers: tuple, dp_rank: int, dp_size: int, pairing: str = "eta",
                                consumed_samples: int = 0, split: str = "train") -> InstructAlignedIterator:
    """``build_aligned_data`` for ``data.kind: instruct`` (collective like it).

    Args:
        tokenizers: ``(student, teacher)`` loaded tokenizers (``text_batches.load_tokenizer_pair(recipe)``).
        dp_rank, dp_size, pairing, consumed_samples, split: as for ``build_aligned_data``.
    """
    return InstructAlignedIterator(_collator(recipe, split, pairing, tokenizers), micro_batch_size=recipe.training.micro_batch_size,
                                   dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples,
                                   kind=recipe.data.kind, split=split)


def build_instruct_aligned_eval_data(recipe, *, tokenizers: tuple, dp_rank: int, dp_size: int, pairing: str = "eta",
                                     split: str = "valid",
                                     num_microbatches: Optional[int] = None) -> InstructAlignedEvalData:
    """``build_aligned_eval_data`` for ``data.kind: instruct`` (``training.eval_batches`` microbatches by default).

    ``tokenizers`` as for :func:`build_instruct_aligned_data`.
    """
    n = num_microbatches if num_microbatches is not None else recipe.training.eval_batches
    if n < 0:
        raise ValueError(f"num_microbatches={n} must be >= 0")
    return InstructAlignedEvalData(_collator(recipe, split, pairing, tokenizers), num_microbatches=n,
                                   micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank,
                                   dp_size=dp_size, kind=recipe.data.kind, split=split)
