"""Temperature policies: the temperature each kept token's loss is computed at.

Design
------
A policy returns a Python float (one temperature for every token) or a detached
fp32 ``[N_kept]`` tensor, which the loss glue passes straight into the
objective's ``temperature`` argument. The glue then multiplies each token's
loss by ``tau**2`` when the policy's ``scale_loss_by_tau_squared`` is true
(Hinton's correction that keeps gradient magnitudes comparable across
temperatures; AdaKD Eq. 2).

Policies (registered names in brackets):

* :class:`ConstantTemperature` (``constant``): ``tau = value``.
* :class:`ScheduledTemperature` (``schedule``): ``tau`` moves from ``start`` to
  ``end`` over the run, linearly or on a half cosine, as a function of the
  optimizer step.
* :class:`IDTS` (``idts``): AdaKD's inverse-difficulty temperature scaling,
  ``tau_i = base * exp(-c * tanh(log(s_i / median(s))))`` per kept token.

Every temperature is detached and identical on all TP ranks: schedules depend
only on the step, IDTS only on TP-replicated scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import PartConfig, Selection, Temperature, TemperaturePolicy, TokenContext
from distill_plugins.selection.scores import ScoreName, compute_score

__all__ = ["ConstantTemperature", "IDTS", "ScheduledTemperature", "idts_temperatures", "schedule_value"]


def _check_positive(key: str, value: float) -> None:
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{key}={value!r} must be a finite number > 0")


class _Policy(TemperaturePolicy):
    """Takes ``scale_loss_by_tau_squared`` from the config instead of the class."""

    def __init__(self, config: Optional[PartConfig] = None):
        super().__init__(config)
        self.scale_loss_by_tau_squared = bool(self.config.scale_loss_by_tau_squared)


class ConstantTemperature(_Policy):
    """One fixed temperature for every token: ``tau = value``."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        value: float = field(default=1.0, metadata={"help": "the temperature, > 0"})
        scale_loss_by_tau_squared: bool = field(default=False, metadata={
            "help": "multiply each token's loss by tau**2 (Hinton); off by default"})

        def __post_init__(self):
            _check_positive("value", self.value)

    def fused_token_stats(self) -> tuple[str, ...]:
        return ()

    def temperatures(self, ctx: TokenContext, selection: Selection) -> Temperature:
        return float(self.config.value)


def schedule_value(start: float, end: float, shape: str, step: int, steps: int) -> float:
    """Scheduled value after ``step`` of ``steps``: ``progress = clamp(step / steps, 0, 1)``.

    ``linear``: ``start + (end - start) * progress``;
    ``cosine``: ``end + (start - end) * (1 + cos(pi * progress)) / 2``.
    """
    progress = min(1.0, max(0.0, step / max(1, steps)))
    if shape == "linear":
        return start + (end - start) * progress
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"shape={shape!r} must be 'linear' or 'cosine'")


class ScheduledTemperature(_Policy):
    """A temperature that moves from ``start`` to ``end`` over the run.

    The step is ``ctx.step`` (optimizer steps completed before this one), so the
    first step uses ``start`` and the value reaches ``end`` at ``steps``
    (``null`` = the run's total steps) and stays there.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        start: float = field(default=1.0, metadata={"help": "temperature at step 0, > 0"})
        end: float = field(default=1.0, metadata={"help": "temperature at the end of the schedule, > 0"})
        shape: Literal["linear", "cosine"] = field(default="linear", metadata={"help": "interpolation shape"})
        steps: Optional[int] = field(default=None, metadata={
            "help": "optimizer steps from start to end; null = the run's total steps"})
        scale_loss_by_tau_squared: bool = field(default=False, metadata={
            "help": "multiply each token's loss by tau**2 (Hinton); off by default"})

        def __post_init__(self):
            _check_positive("start", self.start)
            _check_positive("end", self.end)
            if self.steps is not None and self.steps < 1:
                raise ValueError(f"steps={self.steps!r} must be >= 1 or null")

    def fused_token_stats(self) -> tuple[str, ...]:
        return ()

    def temperatures(self, ctx: TokenContext, selection: Selection) -> Temperature:
        steps = self.config.steps if self.config.steps is not None else ctx.total_steps
        return schedule_value(self.config.start, self.config.end, self.config.shape, ctx.step, steps)


def idts_temperatures(scores: torch.Tensor, base: float, c: float, eps: float = 1e-8) -> torch.Tensor:
    """AdaKD Eqs. 9-10 on the kept tokens' scores: detached fp32 ``[N_kept]``.

    ``tau_i = base * exp(-c * tanh(log((s_i + eps) / (median(s) + eps))))``.
    ``median`` is the lower median (``torch.median``, as the reference code), so
    with an odd count the median token gets exactly ``base``. ``eps`` keeps a
    zero median (half the tokens already matched) from producing 0/0; the ratio
    is also clamped below at ``eps`` so negative scores cannot give NaN.
    Harder tokens (larger s) get lower temperatures; range ``[base e^-c, base e^c]``.
    """
    s = scores.detach().float()
    if s.numel() == 0:
        return s.clone()
    med = torch.median(s)
    rel = torch.clamp((s + eps) / (med + eps), min=eps)
    return base * torch.exp(-c * torch.tanh(torch.log(rel)))


class IDTS(_Policy):
    """AdaKD's inverse difficulty temperature scaling (Xie et al., AAAI 2026, Eqs. 9-10).

    Over the kept tokens, with difficulty ``s_i`` (Hellinger by default):
    ``s_hat_i = tanh(log(s_i / median(s)))`` in [-1, 1] and
    ``tau_i = base * exp(-c * s_hat_i)`` in ``[base e^-c, base e^c]``: hard
    tokens (above the median) get a sharper distribution, easy ones a smoother
    one. Everything is detached. The per-token loss is multiplied by ``tau_i**2``
    (``scale_loss_by_tau_squared``, on by default, as in AdaKD).

    Scores: with ``score: auto`` the selector's :attr:`Selection.scores` are
    reused when present (LATF and top_fraction attach theirs, computed on the
    same logits at temperature 1 before any scaling, as the paper does);
    otherwise Hellinger distances are computed on the kept rows. Naming a score
    always computes that score.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        base: float = field(default=1.0, metadata={"help": "tau_base, the median token's temperature, > 0"})
        c: float = field(default=0.5, metadata={"help": "spread: temperatures lie in [base e^-c, base e^c], >= 0"})
        score: Literal["auto", ScoreName] = field(default="auto", metadata={
            "help": "difficulty score: auto = the selector's scores if any, else hellinger"})
        median_eps: float = field(default=1e-8, metadata={"help": "epsilon guarding a zero median, > 0"})
        scale_loss_by_tau_squared: bool = field(default=True, metadata={
            "help": "multiply each token's loss by tau_i**2 (AdaKD)"})

        def __post_init__(self):
            _check_positive("base", self.base)
            if not (self.c >= 0.0 and math.isfinite(self.c)):
                raise ValueError(f"c={self.c!r} must be a finite number >= 0")
            _check_positive("median_eps", self.median_eps)

    def _scores(self, ctx: TokenContext, selection: Selection) -> torch.Tensor:
        n_kept = ctx.student_logits.shape[0]
        if self.config.score == "auto" and selection.scores is not None:
            s = selection.scores
            if s.shape[0] != n_kept:
                s = s[selection.keep.to(s.device)]
            if s.shape[0] != n_kept:
                raise InputError(f"selection has {s.shape[0]} kept scores but the context holds {n_kept} rows")
            return s
        name = "hellinger" if self.config.score == "auto" else self.config.score
        return compute_score(name, ctx)

    def fused_token_stats(self) -> tuple[str, ...]:
        return ("hellinger" if self.config.score == "auto" else self.config.score,)

    def temperatures(self, ctx: TokenContext, selection: Selection) -> Temperature:
        s = self._scores(ctx, selection)
        tau = idts_temperatures(s, self.config.base, self.config.c, self.config.median_eps)
        return tau.to(ctx.student_logits.device)
