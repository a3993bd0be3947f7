"""Contracts for the kinds of parts a plugin can register.

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

#: label of a position that takes no loss (prompt tokens, padding), as in torch's cross-entropy
IGNORE_INDEX = -100


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

    Fused output layer (docs/objectives.md, "The fused output layer"): an
    objective that sets :attr:`supports_fused_output_layer` is called on row
    chunks of logits computed on the fly from the hidden states, through
    :meth:`loss_and_grad`, and never sees the ``[N, V_local]`` logits at once.
    """

    #: True when the objective keeps the row-chunk contract of the fused output
    #: layer: calling it on the chunks of a partition of the rows (every TP rank
    #: with the same chunks, in the same order) gives the same per-row losses and
    #: gradients as one call on all rows. Checked by
    #: :func:`distill_plugins.testing.contracts.check_objective_contract`.
    supports_fused_output_layer: ClassVar[bool] = False

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

    def loss_and_grad(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        temperature: Temperature = 1.0,
        tp_group: Any = None,
        vocab_size: Optional[int] = None,
        row_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-row losses of a row chunk and, when ``row_weights`` is given, their weighted gradient.

        Returns ``(loss [r] fp32, grad)`` with ``grad = d(sum_i row_weights_i * loss_i) / d
        student_logits`` (``[r, V_local]``, 0 on padded columns), or ``None`` without
        ``row_weights``. The default differentiates :meth:`__call__` with autograd; an
        objective may override it to produce both in one pass.
        """
        if row_weights is None:
            with torch.no_grad():
                return self(student_logits, teacher_logits.detach(), temperature=temperature, tp_group=tp_group,
                            vocab_size=vocab_size).float(), None
        x = student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self(x, teacher_logits.detach(), temperature=temperature, tp_group=tp_group,
                        vocab_size=vocab_size)
            (grad,) = torch.autograd.grad(loss, x, grad_outputs=row_weights.to(loss.dtype))
        return loss.detach().float(), grad


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
        token_stats: on the fused output layer, per-token statistics by name (fp32
            ``[N]`` each, TP-replicated; names in
            :data:`distill_plugins.objectives.fused.TOKEN_STATS`) computed by its
            statistics pass, and the logits fields are placeholders holding only
            shape and device (reading their values raises). None on the materialised path.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    tp_group: Any = None
    vocab_size: Optional[int] = None
    labels: Optional[torch.Tensor] = None
    reference_logits: Optional[torch.Tensor] = None
    step: int = 0
    total_steps: int = 1
    token_stats: Optional[dict[str, torch.Tensor]] = None


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

    def fused_token_stats(self) -> Optional[tuple[str, ...]]:
        """What :meth:`select` reads on the fused output layer, where no logits exist.

        A tuple of names from :data:`distill_plugins.objectives.fused.TOKEN_STATS`
        (``()`` when it reads only ``ctx.student_logits.shape`` / ``.device``) that it
        takes from ``ctx.token_stats``; ``None`` (the default) when it reads the
        logits, so the fused path cannot feed it and the engine keeps the logits.
        """
        return None


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

    def fused_token_stats(self) -> Optional[tuple[str, ...]]:
        """Like :meth:`TokenSelector.fused_token_stats`: the ``ctx.token_stats`` names
        :meth:`temperatures` reads on the fused output layer, or ``None`` (the default)
        when it reads the logits."""
        return None


@dataclass
class AlignerInputs:
    """One microbatch's tensors for a loss-computing aligner (rows already flattened).

    Attributes:
        student_logits: ``[N_s, Vs_local]`` student logits (requires grad).
        teacher_logits: ``[N_t, Vt_local]`` teacher logits (no grad).
        pairs: ``(student_rows [K], teacher_rows [K])`` int64 row indices of
            aligned positions, or None when both sides share one tokenization
            (then ``N_s == N_t`` and row i pairs with row i).
        student_labels: ``[N_s]`` gold next-token ids, -100 where masked.
            Pairs whose student label is -100 are dropped.
        student_hidden: ``[N_s, d_s]`` final hidden states (after the final
            norm, the output layer's input); only for ``needs_hidden_states``.
        teacher_hidden: ``[N_t, d_t]``; likewise.
        student_head_weight: ``[Vs_local, d_s]`` this rank's shard of the
            student's output-layer weight (used detached); likewise.
        teacher_head_weight: ``[Vt_local, d_t]``; likewise.
        tp_group: TP group both vocabularies are sharded over, or None.
        student_vocab_size, teacher_vocab_size: real vocabulary sizes.
        temperature: float, or a per-pair ``[K]`` tensor, passed to objectives.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    student_labels: Optional[torch.Tensor] = None
    student_hidden: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    student_head_weight: Optional[torch.Tensor] = None
    teacher_head_weight: Optional[torch.Tensor] = None
    tp_group: Any = None
    student_vocab_size: Optional[int] = None
    teacher_vocab_size: Optional[int] = None
    temperature: Temperature = 1.0

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student_rows, teacher_rows)`` of the pairs that have a valid student label."""
        device = self.student_logits.device
        if self.pairs is None:
            if self.student_logits.shape[0] != self.teacher_logits.shape[0]:
                raise ValueError(f"pairs=None needs as many student rows ({self.student_logits.shape[0]}) as "
                                 f"teacher rows ({self.teacher_logits.shape[0]}); pass the aligned pairs")
            s = t = torch.arange(self.student_logits.shape[0], device=device)
        else:
            s, t = (p.to(device=device, dtype=torch.long) for p in self.pairs)
        if self.student_labels is not None:
            keep = self.student_labels.to(device)[s] != -100
            s, t = s[keep], t[keep]
        return s, t


@dataclass
class AlignerOutput:
    """A loss-computing aligner's result for one microbatch.

    Attributes:
        loss_sum: scalar fp32, the weighted sum of every term over the aligned
            tokens (differentiable). The engine divides by the global count.
        num_tokens: aligned student tokens this loss covers (its KD normaliser).
        terms: per-term token sums, detached (keys among ``term_names``).
        report: floats to log: ``aligned`` (pairs used), ``student_targets``
            (valid student labels, when labels were given), ``coverage``.
    """

    loss_sum: torch.Tensor
    num_tokens: int
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)


class VocabAligner(Part):
    """Relates the teacher's vocabulary (and tokenization) to the student's.

    Everything the engine asks of an aligner is declared here, with a default
    that fits an aligner which only lays one vocabulary out like the other
    (``identity``); docs/aligners.md has the sequence of calls.

    Class attributes (what the aligner needs from the engine):

    * ``cross_tokenizer``: with two different tokenizers the batches come from
      raw text with both tokenizations and the exact token alignment.
    * ``computes_loss``: the engine calls :meth:`loss` instead of its
      selector -> temperature -> objective glue.
    * ``needs_hidden_states``: :meth:`loss` needs both models' final hidden
      states and output-layer weights (:class:`AlignerInputs`).
    * ``pairing``: how the data path pairs positions, ``"eta"`` (exact token
      alignment) or ``"position"``.
    * ``term_names``: keys of :attr:`AlignerOutput.terms` the engine logs.

    Call sequence in the engine (each rank): ``check`` (at ``distill check``),
    ``objective_name_and_params`` (the engine builds that objective through its
    plugin host), ``setup(student_tokenizer=, teacher_tokenizer=, objective=)``,
    ``build_modules(...)`` on the last pipeline stage (before DDP wraps the
    model), ``trainable_modules()`` into the optimizer (learning rate
    ``learning_rate()``) and the checkpoint, then ``loss(inputs)`` per microbatch.
    """

    cross_tokenizer: ClassVar[bool] = False
    computes_loss: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    term_names: ClassVar[tuple[str, ...]] = ()

    @property
    def pairing(self) -> str:
        """``"eta"`` (exact token alignment) or ``"position"`` (k-th target with k-th target)."""
        return "eta"

    def check(self, *, student_vocab_size: int, teacher_vocab_size: int, **info: Any) -> list[str]:
        """Errors (strings) at ``distill check`` time; empty when compatible."""
        return []

    def objective_name_and_params(self) -> Optional[tuple[str, dict[str, Any]]]:
        """The registered objective :meth:`loss` uses, as ``(name, params)``; None when it uses none."""
        return None

    def setup(self, *, student_tokenizer: Any = None, teacher_tokenizer: Any = None,
              objective: Optional[Objective] = None) -> None:
        """Before the first step: both ``tokenizers.Tokenizer`` objects and the built objective."""

    def build_modules(self, student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                      tp_group: Any = None, student_vocab_size: Optional[int] = None,
                      teacher_vocab_size: Optional[int] = None, seed: int = 0) -> list[torch.nn.Module]:
        """Create and initialise trainable modules from this rank's output-layer shards (last stage only).

        Only called when ``needs_hidden_states``. ``*_head_weight`` are ``[V_local, d]``.
        Returns the modules (the same list :meth:`trainable_modules` returns afterwards).
        """
        return []

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters join the optimizer, the gradient reduction and the checkpoint."""
        return []

    def learning_rate(self) -> Optional[float]:
        """Learning rate of :meth:`trainable_modules`' parameter group; None = ``training.lr``."""
        return None

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        """The aligned loss of one microbatch (only called when ``computes_loss``)."""
        raise NotImplementedError(f"aligner {self.name or type(self).__name__!r} sets computes_loss but has no loss()")


#: where an example's response comes from (values of :attr:`SequencePlan.origin`)
FROM_DATASET, FROM_STUDENT, FROM_TEACHER = 0, 1, 2


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled when a sequence source asks for generation.

    Attributes:
        temperature: softmax temperature; 0 = greedy.
        top_p: nucleus mass kept (1 = all).
        top_k: keep the k most likely tokens (0 = all).
        max_new_tokens: generated tokens per response at most (stops earlier at EOS).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64


@dataclass(frozen=True)
class SequencePlan:
    """A sequence source's decision for one microbatch.

    Attributes:
        origin: int64 ``[b]``, per example ``FROM_DATASET`` (the data's response),
            ``FROM_STUDENT`` (sampled from the current student) or ``FROM_TEACHER``
            (sampled from the teacher). Identical on every rank of a data-parallel
            replica (the engine hands every rank the same generator state).
        sampling: how generated responses are sampled.
    """

    origin: torch.Tensor
    sampling: SamplingParams = field(default_factory=SamplingParams)


class SequenceSource(Part):
    """Decides, per training example, whether its response comes from the data or is generated.

    ``plan(num_examples, *, step, total_steps, generator) -> SequencePlan``. The
    engine generates the responses the plan asks for (prompts from the batch,
    under the student's TP/PP, eval mode, no gradient), masks the prompt, and
    runs the usual loss on the result: objectives, selectors, temperature
    policies and aligners see an ordinary batch. ``generator`` is a CPU
    ``torch.Generator`` seeded from (recipe seed, step, microbatch, data-parallel
    rank), so a plan is reproducible and resumes exactly; draw every random
    decision from it. Sources that keep state (a replay buffer, an adaptive
    mix) implement ``state_dict``/``load_state_dict``/``on_optimizer_step``
    like any part.
    """

    #: whether any plan may ask for generated responses (the engine then needs instruct batches with prompts)
    generates: ClassVar[bool] = True
    #: whether a plan may ask for teacher samples (FROM_TEACHER: the run then needs a built, co-located teacher)
    samples_teacher: ClassVar[bool] = False

    def plan(self, num_examples: int, *, step: int, total_steps: int, generator: torch.Generator) -> SequencePlan:
        raise NotImplementedError


#: registry kind -> base class every registered part of that kind must subclass.
PART_KINDS: dict[str, type[Part]] = {
    "objective": Objective,
    "token_selector": TokenSelector,
    "temperature_policy": TemperaturePolicy,
    "vocab_aligner": VocabAligner,
    "sequence_source": SequenceSource,
}
