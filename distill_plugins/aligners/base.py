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

import dataclasses
import os
from typing import Any, ClassVar, Collection, Optional, Union

import torch

from ..config import did_you_mean
from ..errors import RecipeWarning
from ..interfaces import AlignerInputs, AlignerOutput, Objective, VocabAligner
from .vocab import load_tokenizer, same_vocabulary

__all__ = ["AlignerInputs", "AlignerOutput", "AlignerBase", "ObjectiveSpec", "resolve_aligner", "resolve_aligner_name",
           "recipe_problems", "LOGIT_FREE_POLICIES"]

#: data kinds that hold raw text (cross-tokenizer alignment re-tokenizes it).
TEXT_DATA_KINDS = ("jsonl", "embedded", "instruct")

#: temperature policies that combine with loss-computing aligners (they do not read the logits)
LOGIT_FREE_POLICIES = ("constant", "schedule")

#: ``objective: forward_kl`` or ``objective: {name: skewed_forward_kl, alpha: 0.1}``.
ObjectiveSpec = Union[str, dict[str, Any]]


class AlignerBase(VocabAligner):
    """Common base of the built-in cross-tokenizer aligners (``eta``, ``dskd``, ``uld``).

    They compute their own loss over the aligned pairs (``computes_loss``) and
    re-tokenize raw text when the tokenizers differ (``cross_tokenizer``); the
    engine-facing surface is :class:`~distill_plugins.interfaces.VocabAligner`.
    This base keeps the tokenizers and the objective handed to :meth:`setup`,
    reads the objective from the part's ``objective`` key, and gives a zero
    loss connected to every trainable input for a microbatch with no pair.
    """

    cross_tokenizer: ClassVar[bool] = True
    computes_loss: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    term_names: ClassVar[tuple[str, ...]] = ()

    def setup(self, *, student_tokenizer: Any = None, teacher_tokenizer: Any = None,
              objective: Optional[Objective] = None, **kwargs: Any) -> None:
        """Keep both tokenizers and the objective the engine built from :meth:`objective_name_and_params`."""
        self._tokenizers = (student_tokenizer, teacher_tokenizer)
        if objective is not None:
            self._objective = objective

    @classmethod
    def check_recipe(cls, config: Any, recipe: Any, *, objectives: Optional[Collection[str]] = None) -> list[str]:
        """``distill check`` hook (see ``recipe/validate.py``): :meth:`check` with the recipe's facts.

        ``objectives``: the registered objective names of the validating plugin host (None: unknown).
        """
        part = cls(config)
        part.name = getattr(getattr(recipe, "aligner", None), "name", "") or part.name
        info, errors = recipe_check_info(recipe, objectives=objectives)
        if errors:
            return errors
        problems = recipe_problems(recipe, part.name or cls.__name__) if cls.computes_loss else []
        if cls.needs_hidden_states and recipe.parallel.sequence_parallel:
            problems.append(f"aligner {part.name!r} projects hidden states, which megatron scatters over the "
                            "sequence under parallel.sequence_parallel; set parallel.sequence_parallel: false")
        return problems + part.check(**info)

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
        """The objective handed to :meth:`setup` (the engine builds it through its plugin host)."""
        obj = getattr(self, "_objective", None)
        if obj is None:
            name, _ = self.objective_name_and_params()
            raise RuntimeError(f"aligner {self.name or type(self).__name__!r}: call setup(objective=...) with the "
                               f"built {name!r} objective before loss()")
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
    if same_vocabulary(load_tokenizer(student_tokenizer_path), load_tokenizer(teacher_tokenizer_path)):
        return "identity"
    return cross_tokenizer_default


def resolve_aligner(recipe: Any) -> Any:
    """``recipe`` with ``aligner: auto`` replaced by the registered aligner it stands for.

    The one place ``auto`` is resolved (rules: :func:`resolve_aligner_name`, docs/aligners.md):
    recipe validation returns recipes already resolved, so ``distill run`` resolves once; the
    engine calls it again only for a recipe built in Python, where it is then the first call.
    Tokenizer paths that do not exist on this machine count as unknown.
    """
    if recipe.aligner.name != "auto":
        return recipe
    data = recipe.data
    paths = [p for p in (data.tokenizer, data.teacher_tokenizer) if p]
    readable = all(os.path.exists(p) or p.startswith("embedded:") for p in paths)
    name = resolve_aligner_name(data.tokenizer if readable else None, data.teacher_tokenizer if readable else None,
                                recipe.student.vocab_size, recipe.teacher.vocab_size)
    return dataclasses.replace(recipe, aligner=dataclasses.replace(recipe.aligner, name=name))


def _vocab_size_of(spec: str) -> int:
    """A tokenizer's size; ``embedded:N`` is N without building it."""
    if str(spec).startswith("embedded:") and str(spec)[9:].isdigit():
        return int(str(spec)[9:])
    return int(load_tokenizer(spec).get_vocab_size(with_added_tokens=True))


def recipe_check_info(recipe: Any, *, objectives: Optional[Collection[str]] = None) -> tuple[dict[str, Any], list[str]]:
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
