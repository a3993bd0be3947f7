"""Exact token alignment (ETA) of two tokenizations of one text, and the ``eta`` aligner.

Maths
-----
A sequence ``x_0 .. x_n`` is trained with position ``p`` predicting target
``x_{p+1}``. Student target ``a`` and teacher target ``b`` are *aligned* when

* the text before them is the same: every earlier token of each side
  concatenates to ``text[:c]`` for one character ``c``, and
* the next token is the same text: both targets cover ``text[c:e]``.

Both models then predict a distribution over the same event (the next piece of
text is ``text[c:e]``), so positions ``a-1`` (student) and ``b-1`` (teacher)
are paired. Unpaired positions are masked and counted; coverage =
pairs / student targets. Same tokenizer -> every position pairs with itself.

Boundaries come from the tokenizers' *character offsets*, never from token
strings (``Ġ``/``▁`` spellings differ between tokenizers), and are measured in
UTF-8 bytes of the text. Token ``k`` covers ``(end_{k'}, end_k]`` where ``k'``
is the previous non-special token, so trimmed *start* offsets do not matter.
When the vocabulary's byte lengths are known (byte-level BPE, SentencePiece)
the boundary after token ``k`` is the byte count of tokens ``0..k``, accepted
only if it agrees with the offsets: equal to the UTF-8 length of
``text[:end_k]``, or strictly inside the character ``text[end_k - 1]`` (a
byte-level BPE piece of a multi-byte character reports the whole character's
offsets). This rejects offsets a post-processor trimmed or a normalizer
changed, and lets identical byte pieces of an emoji pair. A constant one-byte
excess (a prefix space added by the pre-tokenizer) is accepted. Without
byte lengths, boundaries are the UTF-8 offsets of the character ends.
End-of-text tokens (``eos_id``) pair when both sides reach them at the same
valid boundary.

Cost: O(L log L) numpy per sequence (cumulative sums and one sorted
intersection of span keys), suitable for a data loader.

The ``eta`` aligner
-------------------
With ETA pairs fixed, the two vocabularies are compared over the tokens they
share (same bytes, :class:`~distill_plugins.aligners.vocab.VocabMap`): the
teacher's logits are gathered into the student's vocabulary layout, columns
of tokens that only one side has get logit ``-1e4`` on both sides (zero
probability, zero gradient), and the configured objective runs on the
student's own vocab shards. The gold next token of an aligned pair is always
shared. TP cost: one all-gather of the teacher logits of the aligned rows
(``[K, Vt]`` per rank, no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..interfaces import PartConfig
from ..parallel import vocab_shard_start
from ._tp import gather_vocab
from .base import AlignerBase, AlignerInputs, AlignerOutput, ObjectiveSpec, coverage_report, validate_objective_spec
from .vocab import VocabMap

__all__ = ["Alignment", "token_spans", "align_tokens", "positional_alignment", "ETAAligner", "MASKED_LOGIT"]

#: logit given to vocabulary columns outside the shared tokens (exp underflows to 0 in fp32).
MASKED_LOGIT = -1.0e4


@dataclass(frozen=True)
class Alignment:
    """Aligned prediction positions of one sequence pair.

    Attributes:
        student_pos: int64 ``[K]`` student positions (predicting target pos+1).
        teacher_pos: int64 ``[K]`` teacher positions, paired element-wise.
        student_targets: number of student targets (sequence length - 1).
    """

    student_pos: np.ndarray
    teacher_pos: np.ndarray
    student_targets: int

    @property
    def num_aligned(self) -> int:
        return int(self.student_pos.size)

    @property
    def coverage(self) -> float:
        return self.num_aligned / self.student_targets if self.student_targets else 0.0


def _utf8_prefix(text: str) -> np.ndarray:
    """int64 ``[len(text)+1]``: UTF-8 byte offset of each character offset."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(cp.size + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def token_spans(ids: Sequence[int], offsets: Any, text: str, *, byte_lengths: Optional[np.ndarray] = None,
                special_ids: Sequence[int] = (), eos_id: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Span key of every token, for exact matching against another tokenization.

    Args:
        ids: ``[n]`` token ids.
        offsets: ``[n, 2]`` character offsets (``Encoding.offsets``).
        text: the encoded text.
        byte_lengths: bytes per id (:func:`~distill_plugins.aligners.vocab.byte_lengths`)
            to verify boundaries, or None to trust the offsets.
        special_ids: ids that cover no text (BOS, EOS, padding...).
        eos_id: an end-of-text id that may pair with the other side's.

    Returns:
        ``(keys, alignable)``: int64 ``[n]`` keys, equal for two tokens exactly
        when they cover the same text after the same prefix, and bool ``[n]``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = ids.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    special = np.isin(ids, np.asarray(list(special_ids), dtype=np.int64)) if len(special_ids) else np.zeros(n, bool)
    content = ~special
    end = np.clip(off[:, 1], 0, len(text))
    u8 = _utf8_prefix(text)
    if byte_lengths is not None:
        nb = np.where(content, byte_lengths[np.clip(ids, 0, byte_lengths.size - 1)], 0)
        cum = np.cumsum(nb)
        first = int(np.argmax(content)) if content.any() else 0
        shift = 1 if cum[first] - u8[end[first]] == 1 else 0  # a prefix space added by the pre-tokenizer
        b_end = cum - shift
        # a boundary is real if it is the end of the token's last character, or strictly inside it
        # (byte-level BPE pieces of one character all report that character's offsets)
        inside = (b_end > u8[np.maximum(end - 1, 0)]) & (b_end < u8[end])
        end_ok = content & ((b_end == u8[end]) | inside)
    else:
        b_end = u8[end]
        end_ok = content & (end >= np.maximum.accumulate(np.concatenate([[0], np.where(content, end, 0)]))[:-1])
    # start of token k = end of the previous content token (0 for the first), in bytes
    prev_end = np.maximum.accumulate(np.concatenate([[0], np.where(content, b_end, 0)]))[:-1]
    idx = np.where(content, np.arange(n), -1)
    last = np.maximum.accumulate(np.concatenate([[-1], idx]))[:-1]  # previous content token
    start_ok = np.where(last >= 0, end_ok[np.maximum(last, 0)], True)
    width = int(u8[-1]) + 2
    keys = prev_end * width + b_end
    alignable = content & start_ok & end_ok & (b_end > prev_end)
    if eos_id is not None:
        is_eos = (ids == eos_id) & start_ok
        keys = np.where(is_eos, prev_end * width + (width - 1), keys)
        alignable |= is_eos
    return keys, alignable


def _pair_keys(s_keys, s_ok, t_keys, t_ok, student_targets: int) -> Alignment:
    # targets are tokens 1..n-1; position p predicts token p+1
    s_idx = np.nonzero(s_ok[1:])[0] + 1
    t_idx = np.nonzero(t_ok[1:])[0] + 1
    _, i_s, i_t = np.intersect1d(s_keys[s_idx], t_keys[t_idx], assume_unique=False, return_indices=True)
    s_pos, t_pos = s_idx[i_s] - 1, t_idx[i_t] - 1
    order = np.argsort(s_pos, kind="stable")
    return Alignment(s_pos[order].astype(np.int64), t_pos[order].astype(np.int64), student_targets)


def align_tokens(text: str, student_ids: Sequence[int], student_offsets: Any, teacher_ids: Sequence[int],
                 teacher_offsets: Any, *, student_byte_lengths: Optional[np.ndarray] = None,
                 teacher_byte_lengths: Optional[np.ndarray] = None, student_special_ids: Sequence[int] = (),
                 teacher_special_ids: Sequence[int] = (), student_eos_id: Optional[int] = None,
                 teacher_eos_id: Optional[int] = None) -> Alignment:
    """Exact token alignment of two tokenizations of ``text`` (see the module docstring).

    Returns:
        The aligned prediction positions; ``student_targets = len(student_ids) - 1``.
    """
    s_keys, s_ok = token_spans(student_ids, student_offsets, text, byte_lengths=student_byte_lengths,
                               special_ids=student_special_ids, eos_id=student_eos_id)
    t_keys, t_ok = token_spans(teacher_ids, teacher_offsets, text, byte_lengths=teacher_byte_lengths,
                               special_ids=teacher_special_ids, eos_id=teacher_eos_id)
    return _pair_keys(s_keys, s_ok, t_keys, t_ok, max(len(student_ids) - 1, 0))


def positional_alignment(student_len: int, teacher_len: int) -> Alignment:
    """ULD's original pairing: the k-th target of each side, for k < min of the target counts."""
    k = max(min(student_len, teacher_len) - 1, 0)
    pos = np.arange(k, dtype=np.int64)
    return Alignment(pos, pos.copy(), max(student_len - 1, 0))


class ETAAligner(AlignerBase):
    """Exact token alignment + the objective over the tokens both vocabularies share.

    Needs ``setup(student_tokenizer=..., teacher_tokenizer=...)`` (or
    ``vocab_map=``) before :meth:`loss`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        objective: ObjectiveSpec = field(default="forward_kl", metadata={
            "help": "registered objective on the shared-token distributions: a name or {name: ..., <params>}"})

        def __post_init__(self):
            validate_objective_spec(self.objective)

    def setup(self, *, student_tokenizer: Any = None, teacher_tokenizer: Any = None, objective=None,
              vocab_map: Optional[VocabMap] = None, **kwargs: Any) -> None:
        """Build the shared-token map from both tokenizers (or take ``vocab_map``)."""
        super().setup(student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, objective=objective)
        if vocab_map is None and student_tokenizer is not None and teacher_tokenizer is not None:
            vocab_map = VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
        self.vocab_map = vocab_map
        self._s2t_cache: dict[Any, torch.Tensor] = {}

    def check(self, *, student_vocab_size: int, teacher_vocab_size: int, **info: Any) -> list[str]:
        return self._check_tokenizers(self.name or "eta", info) + self._check_objective(info)

    def _student_columns_to_teacher(self, v_local: int, start: int, device) -> torch.Tensor:
        key = (v_local, start, str(device))
        if key not in self._s2t_cache:
            s2t = self.vocab_map.student_to_teacher()
            cols = torch.arange(start, start + v_local)
            m = torch.full((v_local,), -1, dtype=torch.long)
            inside = cols < s2t.numel()
            m[inside] = s2t[cols[inside]]
            self._s2t_cache[key] = m.to(device)
        return self._s2t_cache[key]

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        """Objective between the student and the teacher restricted to shared tokens, on aligned rows."""
        if getattr(self, "vocab_map", None) is None:
            raise RuntimeError("ETAAligner.loss needs setup(student_tokenizer=..., teacher_tokenizer=...) first")
        s_rows, t_rows = inputs.rows()
        if s_rows.numel() == 0:
            return self._empty(inputs, s_rows)
        zs = inputs.student_logits[s_rows].float()
        zt = gather_vocab(inputs.teacher_logits[t_rows].detach().float(), inputs.tp_group)
        v_local = zs.shape[-1]
        m = self._student_columns_to_teacher(v_local, vocab_shard_start(v_local, inputs.tp_group), zs.device)
        shared = m >= 0
        zt_mapped = torch.where(shared, zt[:, m.clamp(min=0)], torch.full_like(zs, MASKED_LOGIT))
        zs_masked = torch.where(shared, zs, torch.full_like(zs, MASKED_LOGIT))
        per = self.objective(zs_masked, zt_mapped, temperature=inputs.temperature, tp_group=inputs.tp_group,
                             vocab_size=inputs.student_vocab_size)
        total = per.sum()
        return AlignerOutput(total, int(s_rows.numel()), {"kd": total.detach()},
                             coverage_report(inputs, s_rows, {"shared_vocab": float(self.vocab_map.size)}))
