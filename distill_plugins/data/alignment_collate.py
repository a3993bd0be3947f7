"""The cross-tokenizer data path: raw text -> both token streams + their alignment.

Design
------
A cross-tokenizer aligner compares positions of two tokenizations of the same
text, so the batch must be built from *text*, not from pre-tokenized ids.
:class:`AlignmentCollator` is a ``collate_fn``: it takes a list of strings,
encodes each with both tokenizers (the Rust batch encoder, with character
offsets), truncates them to a common piece of text, and aligns them
(:func:`distill_plugins.aligners.eta.align_tokens`, or ULD's positional
pairing). Everything is per-row numpy on O(L) arrays, cheap enough for data
loader workers.

Truncation: the student keeps ``seq_length + 1`` tokens (inputs plus the last
label); the teacher keeps the tokens that end within the text the student
kept, at most ``teacher_seq_length + 1``. An end-of-document token is
appended to both sides first (``append_eos``) and the two pair when both are
kept.

Batch (B rows; ``Ls = seq_length``, ``Lt = teacher_seq_length``)::

    student_tokens          int64 [B, Ls]     inputs (padding: the eos id)
    student_labels          int64 [B, Ls]     next tokens, -100 on padding
    student_label_offsets   int64 [B, Ls, 2]  character span of each label in its text, -1 on padding
    teacher_tokens / teacher_labels / teacher_label_offsets   the same, [B, Lt]
    align_teacher_pos       int64 [B, Ls]     teacher position paired with each student position, -1 if none
    aligned_mask            bool  [B, Ls]
    num_student_targets     int64 []          valid student labels
    num_aligned             int64 []          aligned student positions

:func:`pair_rows` turns ``align_teacher_pos`` into the row indices of
flattened logits the aligners take; :func:`alignment_report` gives the
coverage figures to log.

Usage::

    collate = AlignmentCollator("student/tokenizer.json", "teacher/tokenizer.json", seq_length=512,
                                teacher_seq_length=640)
    loader = torch.utils.data.DataLoader(texts, batch_size=4, collate_fn=collate)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..aligners.eta import align_tokens, positional_alignment
from ..aligners.vocab import as_backend, byte_lengths, special_ids
from ..errors import InputError

__all__ = ["AlignmentCollator", "pair_rows", "alignment_report"]


def _find_eos(backend: Any, wrapper: Any) -> Optional[int]:
    eos = getattr(wrapper, "eos_id", None)
    if eos is not None:
        return int(eos)
    for token in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>"):
        tid = backend.token_to_id(token)
        if tid is not None:
            return tid
    return None


class _Side:
    def __init__(self, tok: Any, seq_length: int, who: str):
        self.backend = as_backend(tok)
        self.eos_id = _find_eos(self.backend, tok)
        self.byte_lengths = byte_lengths(self.backend)
        self.special_ids = sorted(special_ids(self.backend))
        self.seq_length = seq_length
        self.who = who

    def encode_batch(self, texts: Sequence[str], append_eos: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for text, enc in zip(texts, self.backend.encode_batch(list(texts), add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            if append_eos:
                if self.eos_id is None:
                    raise InputError(f"the {self.who} tokenizer has no end-of-document token to append; "
                                     "pass append_eos=False or add one")
                ids = np.append(ids, self.eos_id)
                off = np.concatenate([off, [[len(text), len(text)]]])
            out.append((ids, off))
        return out


class AlignmentCollator:
    """``collate_fn`` turning raw texts into both token streams and their alignment.

    Args:
        student_tokenizer, teacher_tokenizer: a tokenizers JSON path, HF
            tokenizer directory, ``embedded:N`` spec, a loaded
            ``distill_plugins.data.tokenizer.Tokenizer`` or ``tokenizers.Tokenizer``.
            ``teacher_tokenizer=None`` uses the student's.
        seq_length: student sequence length ``Ls``.
        teacher_seq_length: teacher sequence length ``Lt`` (default ``Ls``);
            give more when the teacher's vocabulary is smaller.
        pairing: ``"eta"`` (exact token alignment) or ``"position"`` (ULD).
        append_eos: append each tokenizer's end-of-document token (only
            reached when a document fits in the window).
        max_chars_per_token: only a prefix of about this many characters per
            student token is encoded (grown when too short).
    """

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any = None, *, seq_length: int,
                 teacher_seq_length: Optional[int] = None, pairing: str = "eta", append_eos: bool = True,
                 max_chars_per_token: int = 32):
        if pairing not in ("eta", "position"):
            raise InputError(f"pairing={pairing!r} must be 'eta' or 'position'")
        if seq_length <= 0:
            raise InputError(f"seq_length={seq_length} must be > 0")
        self.student = _Side(student_tokenizer, seq_length, "student")
        self.teacher = _Side(teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer,
                             teacher_seq_length or seq_length, "teacher")
        self.pairing = pairing
        self.append_eos = append_eos
        self.max_chars_per_token = max_chars_per_token

    def _window(self, text: str) -> str:
        """A prefix of ``text`` long enough for ``seq_length + 1`` student tokens.

        Encoding whole documents only to keep their first tokens wastes the
        loader's time; the window is cut at a whitespace after
        ``max_chars_per_token * (seq_length + 2)`` characters and grown until
        the student's tokens no longer reach its end.
        """
        budget = self.max_chars_per_token * (self.student.seq_length + 2)
        while len(text) > budget:
            cut = text.find(" ", budget)
            if cut < 0:
                return text
            window = text[:cut]
            if len(self.student.backend.encode(window, add_special_tokens=False).ids) > self.student.seq_length + 2:
                return window
            budget *= 2
        return text

    def __call__(self, texts: Sequence[Any]) -> dict[str, torch.Tensor]:
        texts = [t["text"] if isinstance(t, dict) else t for t in texts]
        if not all(isinstance(t, str) for t in texts):
            raise InputError("AlignmentCollator takes raw text strings (or {'text': ...} rows)")
        texts = [self._window(t) for t in texts]
        s_enc = self.student.encode_batch(texts, self.append_eos)
        t_enc = self.teacher.encode_batch(texts, self.append_eos)
        b, ls, lt = len(texts), self.student.seq_length, self.teacher.seq_length
        batch = {
            "student_tokens": np.zeros((b, ls), np.int64), "student_labels": np.full((b, ls), -100, np.int64),
            "student_label_offsets": np.full((b, ls, 2), -1, np.int64),
            "teacher_tokens": np.zeros((b, lt), np.int64), "teacher_labels": np.full((b, lt), -100, np.int64),
            "teacher_label_offsets": np.full((b, lt, 2), -1, np.int64),
            "align_teacher_pos": np.full((b, ls), -1, np.int64),
        }
        for side, arr in (("student", self.student), ("teacher", self.teacher)):
            if arr.eos_id is not None:
                batch[f"{side}_tokens"][:] = arr.eos_id
        for row, text in enumerate(texts):
            s_ids, s_off = s_enc[row]
            t_ids, t_off = t_enc[row]
            s_ids, s_off = s_ids[:ls + 1], s_off[:ls + 1]
            cut = int(s_off[-1, 1]) if s_ids.size else 0
            keep = int(np.searchsorted(np.maximum.accumulate(t_off[:, 1]), cut, side="right")) if t_ids.size else 0
            keep = min(keep, lt + 1)
            t_ids, t_off = t_ids[:keep], t_off[:keep]
            for side, ids, off, length in (("student", s_ids, s_off, ls), ("teacher", t_ids, t_off, lt)):
                n = max(ids.size - 1, 0)
                batch[f"{side}_tokens"][row, :min(ids.size, length)] = ids[:length]
                batch[f"{side}_labels"][row, :n] = ids[1:]
                batch[f"{side}_label_offsets"][row, :n] = off[1:]
            if self.pairing == "eta":
                al = align_tokens(text, s_ids, s_off, t_ids, t_off,
                                  student_byte_lengths=self.student.byte_lengths,
                                  teacher_byte_lengths=self.teacher.byte_lengths,
                                  student_special_ids=self.student.special_ids,
                                  teacher_special_ids=self.teacher.special_ids,
                                  student_eos_id=self.student.eos_id if self.append_eos else None,
                                  teacher_eos_id=self.teacher.eos_id if self.append_eos else None)
            else:
                al = positional_alignment(s_ids.size, t_ids.size)
            batch["align_teacher_pos"][row, al.student_pos] = al.teacher_pos
        out = {k: torch.from_numpy(v) for k, v in batch.items()}
        out["aligned_mask"] = out["align_teacher_pos"] >= 0
        out["num_student_targets"] = (out["student_labels"] != -100).sum()
        out["num_aligned"] = out["aligned_mask"].sum()
        return out


def pair_rows(batch: dict[str, torch.Tensor], layout: str = "bs") -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(student_rows [K], teacher_rows [K])`` of the aligned positions in flattened logits.

    Args:
        batch: an :class:`AlignmentCollator` batch.
        layout: ``"bs"`` for logits flattened from ``[B, L, V]`` (row = b*L + pos),
            ``"sb"`` for megatron's ``[L, B, V]`` (row = pos*B + b).
    """
    pos = batch["align_teacher_pos"]
    b_idx, s_pos = batch["aligned_mask"].nonzero(as_tuple=True)
    t_pos = pos[b_idx, s_pos]
    bsz, ls = pos.shape
    lt = batch["teacher_tokens"].shape[1]
    if layout == "bs":
        return b_idx * ls + s_pos, b_idx * lt + t_pos
    if layout == "sb":
        return s_pos * bsz + b_idx, t_pos * bsz + b_idx
    raise InputError(f"layout={layout!r} must be 'bs' or 'sb'")


def alignment_report(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{"aligned", "student_targets", "coverage"}`` for logging (sum these over microbatches and ranks)."""
    aligned, targets = float(batch["num_aligned"]), float(batch["num_student_targets"])
    return {"aligned": aligned, "student_targets": targets, "coverage": aligned / targets if targets else 0.0}
