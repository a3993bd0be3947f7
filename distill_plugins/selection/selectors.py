"""Token selectors: which valid tokens the distillation loss covers.

Design
------
A selector turns TP-replicated per-token scores (see
:mod:`distill_plugins.selection.scores`) into a bool ``keep [N]``. Because the
scores are bitwise identical on every TP rank and the selection is a
deterministic function of them (a *stable* sort by score descending, so ties go
to the lower token index), every TP rank keeps the same rows without further
communication. ``tp_broadcast: true`` additionally broadcasts the mask from TP
rank 0, a guard for collective implementations that might not return identical
bits everywhere.

Selection is local to each micro-batch and DP rank, as in every reference
implementation. Scalars that steer selection across steps (LATF's ratio, EMA and
reference loss) are updated once per optimizer step from the DP-all-reduced
loss in :class:`~distill_plugins.interfaces.StepStats`, so they are identical
on every rank.

Selectors (registered names in brackets):

* :class:`AllTokens` (``all``): keep every token.
* :class:`TopFraction` (``top_fraction``): keep ``max(1, floor(N * fraction))``
  tokens with the largest score.
* :class:`RandomFraction` (``random_fraction``): keep the same count, chosen
  uniformly at random (a control for ``top_fraction``).
* :class:`LATF` (``latf``): AdaKD's loss-driven adaptive token focusing: top
  ``ratio`` by Hellinger distance, ratio adapted from an EMA of the loss.
* :class:`AdaSPEC` (``adaspec``): keep tokens whose loss gap
  ``KL(p||q) - KL(p||q_ref)`` is at least its ``(1 - fraction)`` quantile.

Normalisation (methods.md section 8): ``all``, ``top_fraction``,
``random_fraction`` and ``latf`` divide by the kept count (AdaKD); ``adaspec``
divides by all valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from distill_plugins.errors import InputError
from distill_plugins.interfaces import PartConfig, Selection, StepStats, TokenContext, TokenSelector
from distill_plugins.parallel import group_size
from distill_plugins.selection.scores import ScoreName, compute_score, loss_gap, token_stat

__all__ = [
    "AdaSPEC",
    "AllTokens",
    "LATF",
    "RandomFraction",
    "SelectorConfig",
    "TopFraction",
    "broadcast_from_tp_rank0",
    "kept_count",
    "top_fraction_keep",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _check_unit_interval(key: str, value: float, *, closed_low: bool = False, open_high: bool = False) -> None:
    """Raise ValueError quoting ``key`` and ``value`` unless value is in (0, 1] (variants by flags)."""
    low_ok = value >= 0.0 if closed_low else value > 0.0
    high_ok = value < 1.0 if open_high else value <= 1.0
    if not (low_ok and high_ok and math.isfinite(value)):
        interval = ("[" if closed_low else "(") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{key}={value!r} must be in {interval}")


def kept_count(n: int, fraction: float) -> int:
    """Tokens kept out of ``n`` at ``fraction``: ``max(1, floor(n * fraction))`` (0 when n = 0).

    A tolerance of 1e-9 absorbs binary rounding (``100 * 0.29`` is 28.999...).
    """
    if n <= 0:
        return 0
    return max(1, min(n, math.floor(n * fraction + 1e-9)))


def top_fraction_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool ``[N]`` marking the ``kept_count(N, fraction)`` highest scores.

    Ties are broken by token index (lower index first) through a stable sort, so
    the result is a deterministic function of ``scores``. NaN scores rank last.
    """
    n = scores.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    k = kept_count(n, fraction)
    if k == 0:
        return keep
    if k == n:
        return keep.fill_(True)
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    order = torch.sort(s, descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep


def broadcast_from_tp_rank0(keep: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """The keep mask of TP rank 0 on every rank of ``tp_group`` (identity when unsharded)."""
    if tp_group is None or group_size(tp_group) == 1 or keep.numel() == 0:
        return keep
    buf = keep.to(torch.uint8).contiguous()
    dist.broadcast(buf, src=dist.get_global_rank(tp_group, 0), group=tp_group)
    return buf.to(torch.bool)


@dataclass(frozen=True, kw_only=True)
class SelectorConfig(PartConfig):
    """Options every built-in selector shares."""

    tp_broadcast: bool = field(default=False, metadata={"help": (
        "broadcast the keep mask from TP rank 0 (the mask is already identical on every TP rank "
        "because it is computed from all-reduced scores; this is a belt-and-braces guard)")})


class _Selector(TokenSelector):
    """Shared plumbing: empty inputs, the optional TP broadcast, detaching scores."""

    def _finish(self, ctx: TokenContext, keep: torch.Tensor, normalize_by: str,
                scores: Optional[torch.Tensor]) -> Selection:
        if self.config.tp_broadcast:
            keep = broadcast_from_tp_rank0(keep, ctx.tp_group)
        return Selection(keep=keep, normalize_by=normalize_by,
                         scores=None if scores is None else scores.detach().float())


# ---------------------------------------------------------------------------
# stateless selectors
# ---------------------------------------------------------------------------


class AllTokens(_Selector):
    """Keep every valid token; the loss is the plain token mean."""

    @dataclass(frozen=True, kw_only=True)
    class Config(SelectorConfig):
        pass

    def fused_token_stats(self) -> tuple[str, ...]:
        return ()

    def select(self, ctx: TokenContext) -> Selection:
        n = ctx.student_logits.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=ctx.student_logits.device)
        return Selection(keep=keep, normalize_by="kept", scores=None)


class TopFraction(_Selector):
    """Keep the fixed fraction of tokens with the highest difficulty score.

    ``keep_i = 1`` iff token i is among the ``max(1, floor(N * fraction))``
    highest ``score`` values (ties to the lower index). The loss is the mean
    over kept tokens. The scores travel in :attr:`Selection.scores` for IDTS.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SelectorConfig):
        fraction: float = field(default=0.75, metadata={"help": "fraction of valid tokens kept, in (0, 1]"})
        score: ScoreName = field(default="hellinger", metadata={"help": "difficulty score ranking the tokens"})

        def __post_init__(self):
            _check_unit_interval("fraction", self.fraction)

    def fused_token_stats(self) -> tuple[str, ...]:
        return (self.config.score,)

    def select(self, ctx: TokenContext) -> Selection:
        scores = compute_score(self.config.score, ctx)
        return self._finish(ctx, top_fraction_keep(scores, self.config.fraction), "kept", scores)


class RandomFraction(_Selector):
    """Keep ``max(1, floor(N * fraction))`` tokens chosen uniformly at random.

    The random stream is a function of ``(seed, ctx.step, micro-batch index
    within the step)`` only, drawn on a private CPU generator, so every TP rank
    draws the same tokens and a resumed run repeats the same choices. DP ranks
    use the same positions on their (different) data.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SelectorConfig):
        fraction: float = field(default=0.75, metadata={"help": "fraction of valid tokens kept, in (0, 1]"})
        seed: int = field(default=0, metadata={"help": "seed of the selection's random stream"})

        def __post_init__(self):
            _check_unit_interval("fraction", self.fraction)

    def __init__(self, config: Optional[PartConfig] = None):
        super().__init__(config)
        self._step = -1
        self._call = 0

    def fused_token_stats(self) -> tuple[str, ...]:
        return ()

    def select(self, ctx: TokenContext) -> Selection:
        if ctx.step != self._step:
            self._step, self._call = ctx.step, 0
        mix = (self.config.seed * 1_000_003 + ctx.step) * 1_000_003 + self._call
        self._call += 1
        gen = torch.Generator(device="cpu").manual_seed(mix % (2**63 - 1))
        n = ctx.student_logits.shape[0]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[: kept_count(n, self.config.fraction)]] = True
        return self._finish(ctx, keep.to(ctx.student_logits.device), "kept", None)


# ---------------------------------------------------------------------------
# LATF (AdaKD)
# ---------------------------------------------------------------------------


class LATF(_Selector):
    """AdaKD's loss-driven adaptive token focusing (Xie et al., AAAI 2026, Eqs. 4-7, Alg. 1).

    Each micro-batch keeps the top ``ratio`` fraction of tokens by Hellinger
    distance (Eq. 5) and the loss is the mean over kept tokens (Eq. 4). After
    every optimizer step, with ``L`` the DP-all-reduced distillation loss:

    1. EMA (Eq. 6): ``ema = L`` on the first step, else ``beta * ema + (1 - beta) * L``.
    2. While ``step <= warmup_fraction * total_steps``: ratio stays ``initial_ratio``.
    3. First step after warm-up: ``ref_loss = ema``, ratio unchanged.
    4. Afterwards (Eq. 7): if ``ema < ref_loss * (1 - eps)`` (stable) then
       ``ratio = max(min_ratio, ratio * (1 - delta))``; if ``ema > ref_loss * (1 + eps)``
       (struggling) then ``ratio = min(max_ratio, ratio * (1 + delta))``; on
       either change ``ref_loss = ema``.

    Paper vs code vs here: Algorithm 1 updates r at the start of step t from
    ``L̄_{t-1}`` and the EMA after the step; doing both in ``on_optimizer_step``
    (EMA first, then the ratio for the next step) is the same sequence. The
    paper initialises the EMA with the untrained student's loss; like the code
    we use the first step's loss (the same quantity, measured on step 1). The
    paper has no floor on r; the code floors at 0.1 (``min_ratio``). The
    paper's ``min(1, .)`` cap is ``max_ratio``. A non-finite loss is skipped
    (state unchanged), identically on every rank.

    State (fp64 Python floats): ``ratio``, ``ema``, ``ref_loss``, ``step``.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SelectorConfig):
        warmup_fraction: float = field(default=0.05, metadata={
            "help": "fraction of total optimizer steps with the ratio held at initial_ratio, in [0, 1]"})
        ema_decay: float = field(default=0.99, metadata={"help": "beta of the loss EMA (Eq. 6), in [0, 1)"})
        ratio_step: float = field(default=0.05, metadata={
            "help": "delta: relative change of the ratio per adjustment (Eq. 7), in [0, 1)"})
        loss_tolerance: float = field(default=0.05, metadata={
            "help": "epsilon: relative EMA change vs the reference loss that triggers an adjustment, >= 0"})
        min_ratio: float = field(default=0.1, metadata={"help": "floor of the ratio, in (0, 1]"})
        initial_ratio: float = field(default=1.0, metadata={"help": "ratio during warm-up (r_0), in (0, 1]"})
        max_ratio: float = field(default=1.0, metadata={"help": "cap of the ratio, in (0, 1]"})
        score: ScoreName = field(default="hellinger", metadata={"help": "difficulty score ranking the tokens"})

        def __post_init__(self):
            _check_unit_interval("warmup_fraction", self.warmup_fraction, closed_low=True)
            _check_unit_interval("ema_decay", self.ema_decay, closed_low=True, open_high=True)
            _check_unit_interval("ratio_step", self.ratio_step, closed_low=True, open_high=True)
            if not (self.loss_tolerance >= 0.0 and math.isfinite(self.loss_tolerance)):
                raise ValueError(f"loss_tolerance={self.loss_tolerance!r} must be >= 0")
            for key in ("min_ratio", "initial_ratio", "max_ratio"):
                _check_unit_interval(key, getattr(self, key))
            if not self.min_ratio <= self.initial_ratio <= self.max_ratio:
                raise ValueError(
                    f"need min_ratio <= initial_ratio <= max_ratio, got min_ratio={self.min_ratio!r}, "
                    f"initial_ratio={self.initial_ratio!r}, max_ratio={self.max_ratio!r}")

    _STATE_KEYS = ("ratio", "ema", "ref_loss", "step")

    def __init__(self, config: Optional[PartConfig] = None):
        super().__init__(config)
        self.ratio: float = float(self.config.initial_ratio)
        self.ema: Optional[float] = None
        self.ref_loss: Optional[float] = None
        self.step: int = 0

    def fused_token_stats(self) -> tuple[str, ...]:
        return (self.config.score,)

    def select(self, ctx: TokenContext) -> Selection:
        scores = compute_score(self.config.score, ctx)
        return self._finish(ctx, top_fraction_keep(scores, self.ratio), "kept", scores)

    def on_optimizer_step(self, stats: StepStats) -> None:
        loss = float(stats.kd_loss)
        self.step = int(stats.step)
        if not math.isfinite(loss):
            return
        cfg = self.config
        self.ema = loss if self.ema is None else cfg.ema_decay * self.ema + (1.0 - cfg.ema_decay) * loss
        if stats.step <= cfg.warmup_fraction * stats.total_steps:
            return
        if self.ref_loss is None:
            self.ref_loss = self.ema
            return
        if self.ema < self.ref_loss * (1.0 - cfg.loss_tolerance):
            self.ratio = max(cfg.min_ratio, self.ratio * (1.0 - cfg.ratio_step))
            self.ref_loss = self.ema
        elif self.ema > self.ref_loss * (1.0 + cfg.loss_tolerance):
            self.ratio = min(cfg.max_ratio, self.ratio * (1.0 + cfg.ratio_step))
            self.ref_loss = self.ema

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ema": self.ema, "ref_loss": self.ref_loss, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._STATE_KEYS if k not in state]
        extra = sorted(set(state) - set(self._STATE_KEYS))
        if missing or extra:
            raise ValueError(f"LATF state: missing keys {missing}, unexpected keys {extra}")
        self.ratio = float(state["ratio"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.ref_loss = None if state["ref_loss"] is None else float(state["ref_loss"])
        self.step = int(state["step"])


# ---------------------------------------------------------------------------
# AdaSPEC
# ---------------------------------------------------------------------------


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) via ``kthvalue``: no 2**24 size limit.

    Position ``q * (N - 1)`` between order statistics ``lo`` and ``hi``,
    interpolated with :func:`torch.lerp` as ``torch.quantile`` does.
    """
    n = values.shape[0]
    pos = q * (n - 1)
    lo_i = min(n - 1, max(0, math.floor(pos)))
    hi_i = min(n - 1, lo_i + 1)
    v = values.float()
    lo = torch.kthvalue(v, lo_i + 1).values
    if hi_i == lo_i or pos == lo_i:
        return lo
    hi = torch.kthvalue(v, hi_i + 1).values
    return torch.lerp(lo, hi, torch.tensor(pos - lo_i, dtype=v.dtype, device=v.device))


class AdaSPEC(_Selector):
    """AdaSPEC's token filter (Hu et al., NeurIPS 2025) for distilling speculative-decoding drafts.

    With ``p`` the teacher (target), ``q`` the student (draft) and ``q_ref`` a
    frozen reference model (the draft's architecture, distilled beforehand):
    ``delta_i = KL(p || q) - KL(p || q_ref)``; keep ``delta_i >= quantile(delta, 1 - fraction)``
    (the reference code's ``k``, default 0.4). The quantile interpolates
    between neighbours as ``torch.quantile`` does in the reference code, so
    about ``fraction`` of the tokens are kept (one fewer or more); ties at the
    threshold are all kept; at least one token is always kept. The loss is ``sum_kept / all valid tokens`` (``normalize_by: all``).

    Needs ``ctx.reference_logits`` (``needs_reference_model``). The gap is
    not passed on as :attr:`Selection.scores` (it is not a difficulty and may be
    negative); IDTS after AdaSPEC computes its own Hellinger scores.
    """

    needs_reference_model = True

    @dataclass(frozen=True, kw_only=True)
    class Config(SelectorConfig):
        fraction: float = field(default=0.4, metadata={
            "help": "k: fraction of tokens kept (those with the largest loss gap), in (0, 1]"})
        normalize_by: Literal["all", "kept"] = field(default="all", metadata={
            "help": "divide the kept loss sum by all valid tokens (AdaSPEC) or by the kept count"})

        def __post_init__(self):
            _check_unit_interval("fraction", self.fraction)

    def fused_token_stats(self) -> tuple[str, ...]:
        return ("loss_gap",)

    def select(self, ctx: TokenContext) -> Selection:
        if ctx.reference_logits is None:
            raise InputError("selector 'adaspec' needs reference model logits (recipe key 'reference'), got none")
        if ctx.token_stats is not None:  # fused output layer: computed by its statistics pass
            gap = token_stat(ctx, "loss_gap")
        else:
            gap = loss_gap(ctx.student_logits, ctx.teacher_logits, ctx.reference_logits,
                           tp_group=ctx.tp_group, vocab_size=ctx.vocab_size)
        if gap.shape[0] == 0:
            keep = torch.zeros(0, dtype=torch.bool, device=gap.device)
        else:
            gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("-inf")), gap)
            keep = gap >= quantile_threshold(gap, 1.0 - self.config.fraction)
            if not bool(keep.any()):  # only when the gaps are non-finite: keep the largest
                keep[torch.argmax(gap)] = True
        return self._finish(ctx, keep, self.config.normalize_by, None)
