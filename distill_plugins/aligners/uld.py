"""``uld``: universal logit distillation, the tokenizer-agnostic baseline.

Maths
-----
For a pair of rows, with ``q = softmax(z_s / tau)`` over the student's real
vocabulary and ``p = softmax(z_t / tau)`` over the teacher's, both sorted in
descending order and the shorter one zero-padded to the longer length::

    uld = sum_k | sort(q)_k - sort(p)_k |

It compares the shapes of the two distributions, never which token is which,
so it needs no vocabulary map. ``pairing: position`` pairs the k-th target of
each sequence, as the original (which aligns the starts of the answers);
``pairing: eta`` uses the exact token alignment instead.

Tensor parallelism
------------------
A sort needs the whole vocabulary. ``top_k: null`` (exact) all-gathers the
student's and the teacher's probabilities of the aligned rows:
``K x (V_s + V_t)`` floats per rank per microbatch, the cost of gathering the
logits. ``top_k: k`` gathers each shard's top ``k`` probabilities
(``K x k x TP`` floats), keeps the global top ``k`` and compares the
remaining mass as one bucket, ``|rest_q - rest_p|``: exact on the head, a lower
bound on the tail's contribution (tail mass is usually small; k ~ 1-4k).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from ..interfaces import PartConfig
from ..parallel import all_reduce_max, masked_logits_fp32
from ..parallel import all_reduce_sum_for_shards
from ._tp import gather_vocab
from .base import AlignerBase, AlignerInputs, AlignerOutput, coverage_report

__all__ = ["ULDAligner", "sorted_probability_distance"]


def _probs(logits: torch.Tensor, temperature, group: Any, vocab_size: Optional[int]) -> torch.Tensor:
    """Softmax of the local shard, normalised over the whole vocabulary (padding -> 0).

    The normaliser's all-reduce sums gradients too: the shard's probabilities
    are gathered next, so each rank back-propagates only its own slice.
    """
    x = logits.float()
    if isinstance(temperature, torch.Tensor):
        x = x / temperature.to(x).reshape(-1, 1)
    elif temperature != 1.0:
        x = x / float(temperature)
    x = masked_logits_fp32(x, group, vocab_size)
    shift = all_reduce_max(x.detach().amax(dim=-1, keepdim=True), group)
    e = torch.exp(x - shift)
    return e / all_reduce_sum_for_shards(e.sum(dim=-1, keepdim=True), group)


def _sorted_head(probs: torch.Tensor, group: Any, top_k: Optional[int]) -> torch.Tensor:
    """Descending probabilities ``[N, k]`` of the whole vocabulary (or its top ``k``)."""
    if top_k is not None:
        k_local = min(top_k, probs.shape[-1])
        probs = probs.topk(k_local, dim=-1, sorted=False).values
    full = gather_vocab(probs, group)
    k = full.shape[-1] if top_k is None else min(top_k, full.shape[-1])
    return full.topk(k, dim=-1, sorted=True).values


def sorted_probability_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                                temperature=1.0, tp_group: Any = None, student_vocab_size: Optional[int] = None,
                                teacher_vocab_size: Optional[int] = None, top_k: Optional[int] = None) -> torch.Tensor:
    """ULD per row: ``[N, Vs_local]``, ``[N, Vt_local]`` -> fp32 ``[N]`` (replicated over TP).

    Differentiable with respect to ``student_logits``; the teacher is detached.
    """
    q = _sorted_head(_probs(student_logits, temperature, tp_group, student_vocab_size), tp_group, top_k)
    with torch.no_grad():
        p = _sorted_head(_probs(teacher_logits.detach(), temperature, tp_group, teacher_vocab_size), tp_group, top_k)
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    dist = (q - p).abs().sum(-1)
    if top_k is not None:
        dist = dist + ((1 - q.sum(-1)).clamp(min=0) - (1 - p.sum(-1)).clamp(min=0)).abs()
    return dist


class ULDAligner(AlignerBase):
    """Sorted-probability L1 between the two models' distributions on paired rows."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pairing: Literal["position", "eta"] = field(default="position", metadata={
            "help": "rows compared: k-th target of each side (original ULD) or exact token alignment"})
        top_k: Optional[int] = field(default=None, metadata={
            "help": "null: exact (gathers the vocabulary over TP); k: top-k per side plus one rest bucket"})

        def __post_init__(self):
            if self.top_k is not None and self.top_k <= 0:
                raise ValueError(f"top_k must be > 0 or null, got {self.top_k!r}")

    @property
    def pairing(self) -> str:  # type: ignore[override]
        return self.config.pairing

    def check(self, *, student_vocab_size: Optional[int], teacher_vocab_size: Optional[int], **info: Any) -> list[str]:
        if info.get("teacher_tokenizer") is None:
            return []  # one tokenizer: rows pair one to one
        return self._check_tokenizers(self.name or "uld", info)

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        s_rows, t_rows = inputs.rows()
        if s_rows.numel() == 0:
            return self._empty(inputs, s_rows)
        per = sorted_probability_distance(
            inputs.student_logits[s_rows], inputs.teacher_logits[t_rows], temperature=inputs.temperature,
            tp_group=inputs.tp_group, student_vocab_size=inputs.student_vocab_size,
            teacher_vocab_size=inputs.teacher_vocab_size, top_k=self.config.top_k)
        total = per.sum()
        return AlignerOutput(total, int(s_rows.numel()), {"uld": total.detach()}, coverage_report(inputs, s_rows))
