"""What every aligner hands the engine, and how ``aligner: auto`` resolves.

Design
------
An aligner answers two questions for the engine:

1. *Which rows compare?* Same tokenizer: row ``i`` of the student with row
   ``i`` of the teacher (``pairs=None``). Different tokenizers: the
   data path (:mod:`distill_plugins.data.alignment_collate`) pairs
   positions by exact token alignment and the engine passes the flattened
   ``(student_rows, teacher_rows)`` index tensors.
2. *How do the two distributions compare?* ``identity`` only lays the
   teacher's logits out like the student's and leaves the loss to the
   engine's usual glue (selector, temperature, objective). The
   cross-tokenizer aligners (``eta``, ``dskd``, ``uld``) compute their loss
   themselves with :meth:`AlignerBase.loss` and return a token *sum* and a
   token count, so the engine divides by the global count as for any loss.

Tensor conventions are those of :mod:`distill_plugins.interfaces`: logits
``[N, V_local]`` are shards of each model's own padded vocabulary over the
same TP group; ``*_vocab_size`` are the real sizes; maths in fp32.

Check-time information (keyword arguments of ``check``):
``student_tokenizer`` / ``teacher_tokenizer`` (paths or None),
``tensor_parallel`` (int) and ``objectives`` (registered objective names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch

from ..errors import RecipeWarning
from ..interfaces import Objective, Temperature, VocabAligner

__all__ = ["AlignerInputs", "AlignerOutput", "AlignerBase", "ObjectiveSpec", "resolve_aligner_name",
           "recipe_problems", "LOGIT_FREE_POLICIES"]

#: data kinds that hold raw text (cross-tokenizer alignment re-tokenizes it).
TEXT_DATA_KINDS = ("jsonl", "embedded")

#: temperature policies that combine with loss-computing aligners (they do not read the logits)
LOGIT_FREE_POLICIES = ("constant", "schedule")

#: ``objective: forward_kl`` or ``objective: {name: skewed_forward_kl, alpha: 0.1}``.
ObjectiveSpec = Union[str, dict[str, Any]]


@dataclass
class AlignerInputs:
    """One microbatch's tensors for a cross-tokenizer aligner (rows already flattened).

    Attributes:
        student_logits: ``[N_s, Vs_local]`` student logits (requires grad).
        teacher_logits: ``[N_t, Vt_local]`` teacher logits (no grad).
        pairs: ``(student_rows [K], teacher_rows [K])`` int64 row indices of
            aligned positions, or None when both sides share one tokenization
            (then ``N_s == N_t`` and row i pairs with row i).
        student_labels: ``[N_s]`` gold next-token ids, -100 where masked.
            Pairs whose student label is -100 are dropped.
        student_hidden: ``[N_s, d_s]`` final hidden states (after the final
            norm, the output layer's input); DSKD only.
        teacher_hidden: ``[N_t, d_t]``; DSKD only.
        student_head_weight: ``[Vs_local, d_s]`` this rank's shard of the
            student's output-layer weight; DSKD only (used detached).
        teacher_head_weight: ``[Vt_local, d_t]``; DSKD only.
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
    """An aligner's loss for one microbatch.

    Attributes:
        loss_sum: scalar fp32, the weighted sum of every term over the aligned
            tokens (differentiable). The engine divides by the global count.
        num_tokens: aligned student tokens this loss covers (the normaliser).
        terms: per-term token sums, detached (e.g. ``t2s_ce``, ``s2t_kd``).
        report: floats to log: ``aligned`` (pairs used), ``student_targets``
            (valid student labels, when labels were given), ``coverage``.
    """

    loss_sum: torch.Tensor
    num_tokens: int
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)


class AlignerBase(VocabAligner):
    """Common engine-facing surface of the built-in aligners.

    Class attributes tell the engine what an aligner needs:

    * ``cross_tokenizer``: the batch must carry both tokenizations and the
      exact token alignment (build it with ``AlignmentCollator``).
    * ``computes_loss``: the engine calls :meth:`loss` instead of its own
      objective glue.
    * ``needs_hidden_states``: :class:`AlignerInputs` must carry the final
      hidden states and output-layer weights of both models.
    """

    cross_tokenizer: ClassVar[bool] = True
    computes_loss: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    #: how the data path pairs positions: "eta" (exact token alignment) or "position".
    pairing: str = "eta"
    #: keys of ``AlignerOutput.terms`` the engine logs per step (token means over aligned tokens).
    term_names: ClassVar[tuple[str, ...]] = ()

    def setup(self, *, student_tokenizer: Any = None, teacher_tokenizer: Any = None,
              objective: Optional[Objective] = None, **kwargs: Any) -> None:
        """Give the aligner what it needs before the first step (engine, once per rank).

        Args:
            student_tokenizer, teacher_tokenizer: ``tokenizers.Tokenizer`` objects.
            objective: the objective built from the aligner's ``objective``
                key by the engine's plugin host (so recipe plugins count); when
                omitted it is built on first use from a fresh host.
        """
        self._tokenizers = (student_tokenizer, teacher_tokenizer)
        if objective is not None:
            self._objective = objective

    @classmethod
    def check_recipe(cls, config: Any, recipe: Any) -> list[str]:
        """``distill check`` hook (see ``recipe/validate.py``): :meth:`check` with the recipe's facts."""
        part = cls(config)
        part.name = getattr(getattr(recipe, "aligner", None), "name", "") or part.name
        info, errors = recipe_check_info(recipe)
        if errors:
            return errors
        problems = recipe_problems(recipe, part.name or cls.__name__) if cls.computes_loss else []
        if cls.needs_hidden_states and recipe.parallel.sequence_parallel:
            problems.append(f"aligner {part.name!r} projects hidden states, which megatron scatters over the "
                            "sequence under parallel.sequence_parallel; set parallel.sequence_parallel: false")
        return problems + part.check(**info)

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters join the optimizer and the checkpoint (default none)."""
        return []

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        raise NotImplementedError

    def _empty(self, inputs: AlignerInputs, s_rows: torch.Tensor) -> AlignerOutput:
        """A zero loss still connected to every trainable input (a microbatch with no aligned token).

        TP ranks hold the same batch, so they all take this path together and
        no collective is skipped on one rank only.
        """
        zero = inputs.student_logits.sum() * 0.0
        for module in self.trainable_modules():
            zero = zero + sum(p.sum() * 0.0 for p in module.parameters())
        if inputs.student_hidden is not None and inputs.student_hidden.requires_grad:
            zero = zero + inputs.student_hidden.sum() * 0.0
        return AlignerOutput(zero.float(), 0, {}, coverage_report(inputs, s_rows))

    # -- objective binding (eta, dskd) ---------------------------------------
    def objective_name_and_params(self) -> tuple[str, dict[str, Any]]:
        """The registered objective this aligner uses, from its ``objective`` key."""
        spec = getattr(self.config, "objective", "forward_kl")
        if isinstance(spec, str):
            return spec, {}
        params = dict(spec)
        return str(params.pop("name")), params

    @property
    def objective(self) -> Objective:
        obj = getattr(self, "_objective", None)
        if obj is None:
            from .. import build_part

            name, params = self.objective_name_and_params()
            obj = self._objective = build_part("objective", name, **params)
        return obj

    def _check_objective(self, info: dict[str, Any]) -> list[str]:
        spec = getattr(self.config, "objective", None)
        if isinstance(spec, dict) and "name" not in spec:
            return [f"aligner {self.name or type(self).__name__}: objective {spec!r} needs a 'name' key"]
        names = info.get("objectives")
        if names is None or spec is None:
            return []
        name, _ = self.objective_name_and_params()
        if name not in names:
            from ..config import did_you_mean

            return [f"aligner {self.name!r}: objective {name!r} is not registered{did_you_mean(name, names)}; "
                    f"registered: {', '.join(sorted(names))}"]
        return []

    @staticmethod
    def _check_tokenizers(name: str, info: dict[str, Any]) -> list[str]:
        errors = []
        for side in ("student", "teacher"):
            path = info.get(f"{side}_tokenizer")
            if path is None:
                key = "data.tokenizer" if side == "student" else "data.teacher_tokenizer"
                errors.append(f"aligner {name!r} compares two tokenizations of the same text and needs the "
                              f"{side}'s tokenizer: set {key}")
            elif not str(path).startswith("embedded:") and not os.path.exists(path):
                # a warning: recipes for a cluster name paths that exist there, not here
                errors.append(RecipeWarning(f"aligner {name!r}: {side} tokenizer {path!r} does not exist on this "
                                            "machine; the alignment is not checked"))
        kind = info.get("data_kind")
        if kind is not None and kind not in TEXT_DATA_KINDS:
            errors.append(f"aligner {name!r} tokenizes raw text with both tokenizers, but data.kind={kind!r} "
                          f"holds token ids; use data.kind: {' or '.join(TEXT_DATA_KINDS)}")
        return errors


def recipe_problems(recipe: Any, name: str) -> list[str]:
    """Recipe parts that cannot combine with a loss-computing aligner ``name``.

    Such an aligner compares two vocabularies itself, so the engine cannot run
    a selector or a temperature policy that reads both models' logits over one
    vocabulary: the selector must be ``all`` and the policy one of
    :data:`LOGIT_FREE_POLICIES`.
    """
    problems = []
    if recipe.selector.name != "all":
        problems.append(f"selector {recipe.selector.name!r} scores tokens from both models' logits over one "
                        f"vocabulary; aligner {name!r} compares two vocabularies itself: use selector: all")
    if recipe.temperature.name not in LOGIT_FREE_POLICIES:
        problems.append(f"temperature {recipe.temperature.name!r} reads both models' logits over one vocabulary; "
                        f"with aligner {name!r} use temperature: {' or '.join(LOGIT_FREE_POLICIES)}")
    return problems


def validate_objective_spec(spec: Any, key: str = "objective") -> None:
    """``__post_init__`` helper: a name, or a mapping with a ``name``."""
    if isinstance(spec, dict):
        if not isinstance(spec.get("name"), str):
            raise ValueError(f"{key}={spec!r} must be a registered objective name or a mapping with a 'name' key")
    elif not isinstance(spec, str) or not spec:
        raise ValueError(f"{key}={spec!r} must be a registered objective name")


def resolve_aligner_name(student_tokenizer_path: Optional[str], teacher_tokenizer_path: Optional[str],
                         student_vocab: Optional[int], teacher_vocab: Optional[int],
                         cross_tokenizer_default: str = "dskd") -> str:
    """The aligner ``aligner: auto`` stands for.

    Rules, in order:

    1. No teacher tokenizer, or the same file: ``identity`` if the real vocab
       sizes agree (or are unknown), else ``cross_tokenizer_default``.
    2. Two tokenizer files: load both; ``identity`` when every token string has
       the same id on both sides, else ``cross_tokenizer_default``.

    ``identity``'s own ``check`` then reports size mismatches with a fix.
    """
    same_file = (teacher_tokenizer_path is None or student_tokenizer_path is None
                 or os.path.realpath(teacher_tokenizer_path) == os.path.realpath(student_tokenizer_path))
    if same_file:
        if student_vocab is None or teacher_vocab is None or student_vocab == teacher_vocab:
            return "identity"
        return cross_tokenizer_default
    from .vocab import load_tokenizer, same_vocabulary

    if same_vocabulary(load_tokenizer(student_tokenizer_path), load_tokenizer(teacher_tokenizer_path)):
        return "identity"
    return cross_tokenizer_default


def _vocab_size_of(spec: str) -> int:
    """A tokenizer's size; ``embedded:N`` is N without building it."""
    if str(spec).startswith("embedded:") and str(spec)[9:].isdigit():
        return int(str(spec)[9:])
    from .vocab import load_tokenizer

    return int(load_tokenizer(spec).get_vocab_size(with_added_tokens=True))


def recipe_check_info(recipe: Any) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for ``check`` from a recipe, and errors met while gathering them.

    Real vocab sizes are ``student.vocab_size`` / ``teacher.vocab_size`` when
    set, else the size of that side's tokenizer (``data.teacher_tokenizer``,
    falling back to ``data.tokenizer``), else None (unknown).
    """
    errors: list[str] = []
    s_tok, t_tok = recipe.data.tokenizer, recipe.data.teacher_tokenizer
    sizes: dict[str, Optional[int]] = {}
    for side, spec, tok in (("student", recipe.student, s_tok), ("teacher", recipe.teacher, t_tok or s_tok)):
        sizes[side] = spec.vocab_size
        if sizes[side] is None and tok is not None:
            if not str(tok).startswith("embedded:") and not os.path.exists(tok):
                continue  # unknown here; the tokenizer checks warn about the path
            try:
                sizes[side] = _vocab_size_of(tok)
            except Exception as exc:  # reported: check gathers every error
                key = "data.tokenizer" if tok == s_tok else "data.teacher_tokenizer"
                errors.append(f"{key}: cannot load tokenizer {tok!r}: {exc}")
    objectives = None
    try:
        from ..manager import build_plugin_host

        objectives = build_plugin_host(list(recipe.plugins)).names("objective")
    except Exception:  # plugin errors are reported by recipe validation itself
        pass
    info = {"student_vocab_size": sizes["student"], "teacher_vocab_size": sizes["teacher"],
            "student_tokenizer": s_tok, "teacher_tokenizer": t_tok, "data_kind": recipe.data.kind,
            "tensor_parallel": recipe.parallel.tensor, "objectives": objectives}
    return info, errors


def coverage_report(inputs: AlignerInputs, s_rows: torch.Tensor, extra: Optional[dict] = None) -> dict[str, float]:
    """``aligned`` pairs, and ``student_targets`` / ``coverage`` when labels are known."""
    report = {"aligned": float(s_rows.numel())}
    if inputs.student_labels is not None:
        targets = float((inputs.student_labels != -100).sum())
        report["student_targets"] = targets
        report["coverage"] = report["aligned"] / targets if targets else 0.0
    report.update(extra or {})
    return report
