"""Contracts for the four kinds of parts a plugin can register.

Design
------
A *part* is a class with a nested, frozen, keyword-only ``Config`` dataclass. The
registry checks recipe parameters against ``Config`` (unknown key, wrong type, a
``__post_init__`` check) before it builds ``Part(config)``. Parts that carry state
across optimizer steps (LATF's ratio, TAID's t) implement ``state_dict`` /
``load_state_dict`` and ``on_optimizer_step``; the engine saves that state in
checkpoints and calls ``on_optimizer_step`` once per optimizer step with a loss
that is already all-reduced over the data-parallel group, so every rank agrees.

Tensor conventions (shared by every part)
-----------------------------------------
* Logits are ``[N, V_local]``: ``N`` token rows, the rank's contiguous slice
  ``[rank * V_local, (rank + 1) * V_local)`` of the *padded* vocabulary.
* ``tp_group`` is the tensor-parallel process group the vocabulary is sharded
  over; ``None`` means unsharded.
* ``vocab_size`` is the real vocabulary; columns at or past it are padding and
  are excluded from every softmax, mean and count. ``None`` means no padding.
* Rows handed to selectors, policies and objectives are valid tokens only: the
  loss glue drops masked rows (label == -100) before calling them.
* Per-token results are fp32 ``[N]`` tensors, identical on every TP rank.

Usage::

    from distill_plugins import hookimpl, Objective

    class MyLoss(Objective):
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Config(PartConfig):
            margin: float = 1.0

        def __call__(self, student_logits, teacher_logits, *, temperature=1.0,
                     tp_group=None, vocab_size=None):
            ...

    @hookimpl
    def distill_register_objectives(register):
        register("my_loss", MyLoss)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

import torch

Temperature = Union[float, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class PartConfig:
    """Base of every part's config. Subclass it with frozen, kw_only fields."""


@dataclass(frozen=True)
class StepStats:
    """What the engine tells stateful parts after each optimizer step.

    Attributes:
        step: optimizer steps completed so far (1 after the first step).
        total_steps: optimizer steps planned for the run.
        kd_loss: the step's distillation loss, a token mean all-reduced over the
            data-parallel group (identical on all ranks).
        extras: other all-reduced scalars by name (e.g. ``"kept_fraction"``).
    """

    step: int
    total_steps: int
    kd_loss: float
    extras: dict[str, float] = field(default_factory=dict)


class Part:
    """Base of objectives, selectors, temperature policies and aligners."""

    Config: ClassVar[type[PartConfig]] = PartConfig
    #: registered name; set by the registry when the part is built.
    name: str = ""

    def __init__(self, config: Optional[PartConfig] = None):
        self.config = config if config is not None else self.Config()

    # -- state carried across optimizer steps ------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state saved in checkpoints. Stateless parts return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")

    def on_optimizer_step(self, stats: StepStats) -> None:
        """Called once per optimizer step on every rank, with DP-reduced figures."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields})"


class Objective(Part):
    """A distillation loss over vocab-parallel logits.

    ``__call__(student_logits [N, V_local], teacher_logits [N, V_local], *,
    temperature: float | Tensor[N] = 1.0, tp_group=None, vocab_size=None) -> Tensor[N]``
    returns per-token losses in fp32, differentiable with respect to
    ``student_logits``. Inputs may be bf16/fp16/fp32; the maths is fp32. The
    teacher logits are never given a gradient. Reduction over tokens is the
    caller's job: it sums and divides by the global token count.
    """

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        temperature: Temperature = 1.0,
        tp_group: Any = None,
        vocab_size: Optional[int] = None,
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class TokenContext:
    """Everything a selector or temperature policy may look at, for N valid tokens.

    Attributes:
        student_logits: ``[N, V_local]`` (may require grad; parts must detach).
        teacher_logits: ``[N, V_local]``.
        tp_group: TP group of the vocab shard, or None.
        vocab_size: real vocabulary size, or None.
        labels: ``[N]`` gold next-token ids (global ids), or None.
        reference_logits: ``[N, V_local]`` from a reference model (AdaSPEC), or None.
        step: optimizer steps completed before this one.
        total_steps: optimizer steps planned for the run.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    tp_group: Any = None
    vocab_size: Optional[int] = None
    labels: Optional[torch.Tensor] = None
    reference_logits: Optional[torch.Tensor] = None
    step: int = 0
    total_steps: int = 1


@dataclass
class Selection:
    """A selector's decision for N valid tokens.

    Attributes:
        keep: bool ``[N]``; identical on every TP rank.
        normalize_by: ``"kept"`` divides the loss sum by the number of kept
            tokens (AdaKD), ``"all"`` by the number of valid tokens (AdaSPEC).
        scores: optional fp32 ``[N]`` difficulty scores, for temperature
            policies that reuse them (IDTS reuses LATF's Hellinger scores).
    """

    keep: torch.Tensor
    normalize_by: Literal["kept", "all"] = "kept"
    scores: Optional[torch.Tensor] = None


class TokenSelector(Part):
    """Chooses which valid tokens the distillation loss covers.

    ``select(ctx: TokenContext) -> Selection``. Selection must be a function of
    TP-replicated per-token scalars so every TP rank keeps the same rows.
    """

    #: whether this selector needs ``ctx.reference_logits`` (a reference model).
    needs_reference_model: ClassVar[bool] = False

    def select(self, ctx: TokenContext) -> Selection:
        raise NotImplementedError


class TemperaturePolicy(Part):
    """Gives the temperature each kept token's loss is computed at.

    ``temperatures(ctx: TokenContext, selection: Selection) -> float | Tensor[N_kept]``
    where ``ctx`` already holds only the kept rows. The result is detached and
    goes straight into the objective's ``temperature`` argument. When
    ``scale_loss_by_tau_squared`` is true the loss glue multiplies each token's
    loss by tau**2 (AdaKD, Hinton).
    """

    scale_loss_by_tau_squared: bool = False

    def temperatures(self, ctx: TokenContext, selection: Selection) -> Temperature:
        raise NotImplementedError


class VocabAligner(Part):
    """Relates the teacher's vocabulary (and tokenization) to the student's.

    ``check(student_vocab_size, teacher_vocab_size, **info) -> list[str]`` runs at
    ``distill check`` time and returns error strings (empty when compatible).
    The engine-facing methods are defined by each aligner family; see
    ``docs/aligners.md``.
    """

    def check(self, *, student_vocab_size: int, teacher_vocab_size: int, **info: Any) -> list[str]:
        return []


#: registry kind -> base class every registered part of that kind must subclass.
PART_KINDS: dict[str, type[Part]] = {
    "objective": Objective,
    "token_selector": TokenSelector,
    "temperature_policy": TemperaturePolicy,
    "vocab_aligner": VocabAligner,
}
