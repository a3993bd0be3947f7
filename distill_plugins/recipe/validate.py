"""Recipe validation that gathers every error before reporting.

Checks, in order, all collected into one :class:`RecipeError`:

1. the schema (unknown keys, types, ranges) via :func:`parse_dataclass`;
2. each part section (objective, selector, temperature, aligner): the name is
   registered, its parameters fit the part's ``Config``;
3. each part's own recipe check: a part class may define
   ``check_recipe(config, recipe) -> list[str]`` (e.g. the identity aligner
   compares the two vocabularies);
4. cross-section structure: heads and query groups divisible by TP, layers of
   both models divisible by PP, CE mixing needs labels, a tokenizer no larger
   than its model's vocabulary, an existing ``checkpoint.resume`` path,
   ``loss.fused_output_layer: true`` only with parts that run fused
   (:func:`fused_output_layer_errors`), ...;
5. every plugin's ``distill_validate_recipe`` hook, only when the schema and
   every part's parameters passed (so plugins never see unchecked values). It
   receives the recipe as plain data with each part section as
   ``{"name": <registered name>, "params": {<every Config field, defaults
   filled in>}}`` (``aligner: auto`` already resolved); an exception in a
   plugin's hook becomes an error naming the plugin.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Optional

from ..aligners.base import resolve_aligner
from ..config import parse_dataclass, to_plain
from ..data.embedded import DEFAULT_VOCAB_SIZE
from ..data.tokenizer import load_tokenizer
from ..engine.teacher_ranks import separate_teacher_errors
from ..errors import DistillError, InputError, RecipeError, RecipeWarning
from ..logging import get_logger
from ..manager import build_plugin_host
from ..models.resolve import resolve_or_fallback
from ..objectives.fused import decide_fused_output_layer
from .schema import PART_SECTIONS, ModelSpec, Recipe, parse_recipe, split_parts

log = get_logger(__name__)

#: part names accepted in place of a registered name, per section
PART_PLACEHOLDERS = {"aligner": {"auto"}}


def _structure_errors(recipe: Recipe, vocab_out: Optional[dict[str, Optional[int]]] = None) -> list[str]:
    """Cross-section errors; ``vocab_out[role]`` receives each model's vocabulary when it is known here."""
    errors: list[str] = []
    tp, pp = recipe.parallel.tensor, recipe.parallel.pipeline
    models: list[tuple[str, Optional[ModelSpec]]] = [("student", recipe.student), ("teacher", recipe.teacher),
                                                     ("reference", recipe.reference)]
    for role, spec in models:
        if spec is None:
            continue
        if spec.hf or spec.megatron or spec.checkpoint:
            warnings: list[str] = []
            checkpoint = bool(spec.megatron or spec.checkpoint)
            try:
                # hf: config.json; megatron:/checkpoint: distill_model.json; else (absent here) the recipe's keys
                spec, source = resolve_or_fallback(role, spec, warnings)
            except RecipeError as exc:
                errors.extend(exc.errors)
                continue
            errors.extend(RecipeWarning(w) for w in warnings)
            if checkpoint and source == "recipe":
                continue  # checkpoint absent on this machine: the recipe's shape keys do not describe it
        if vocab_out is not None:
            vocab_out[role] = spec.vocab_size
        if role == "teacher" and recipe.teacher_parallel is not None:
            continue  # the teacher on its own ranks has its own TP/PP: separate_teacher_errors below
        if spec.num_attention_heads % tp:
            errors.append(f"{role}.num_attention_heads={spec.num_attention_heads} is not divisible by "
                          f"parallel.tensor={tp}")
        groups = spec.num_query_groups or spec.num_attention_heads
        if groups % tp:
            errors.append(f"{role}.num_query_groups={groups} is not divisible by parallel.tensor={tp}")
        if spec.num_layers % pp:
            errors.append(f"{role}.num_layers={spec.num_layers} is not divisible by parallel.pipeline={pp}")
        if recipe.data.seq_length > spec.max_position_embeddings:
            errors.append(f"data.seq_length={recipe.data.seq_length} exceeds {role}.max_position_embeddings="
                          f"{spec.max_position_embeddings}")
    errors.extend(separate_teacher_errors(recipe))  # teacher_parallel: docs/separate_teacher.md
    if recipe.parallel.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    data = recipe.data
    if data.kind in ("jsonl", "indexed", "instruct") and not data.paths:
        errors.append(f"data.kind={data.kind!r} needs data.paths (jsonl files or indexed-dataset prefixes; "
                      "instruct: JSON-lines files or [embedded])")
    embedded_task = data.kind == "instruct" and list(data.paths) == ["embedded"]  # default tokenizer embedded:4096
    if data.kind in ("jsonl", "instruct") and not data.tokenizer and not embedded_task:
        errors.append(f"data.kind={data.kind!r} tokenizes raw text and needs data.tokenizer (a tokenizers JSON file "
                      "or a Hugging Face tokenizer directory)")
    has_vocab = data.tokenizer or data.kind == "embedded" or embedded_task
    for role, spec in (("student", recipe.student), ("teacher", recipe.teacher)):
        if spec.vocab_size is None and not (spec.hf or spec.megatron or spec.checkpoint) and not has_vocab:
            errors.append(f"{role}.vocab_size is not set and there is no data.tokenizer to take it from; "
                          f"set {role}.vocab_size")
    if recipe.training.eval_generate and data.kind != "instruct":  # generation-based evaluation: docs/eval.md
        errors.append(f"training.eval_generate={recipe.training.eval_generate} answers held-out prompts, but "
                      f"data.kind={data.kind!r} has none; use data.kind: instruct or set training.eval_generate: 0")
    elif recipe.training.eval_generate and recipe.teacher_parallel is not None:
        errors.append(f"training.eval_generate={recipe.training.eval_generate}: generation-based evaluation during a "
                      "run with teacher_parallel is not supported (the teacher ranks do not take part); set "
                      "training.eval_generate: 0 and score checkpoints with distill eval, which co-locates the teacher")
    elif recipe.training.eval_generate and not recipe.training.eval_interval:
        errors.append(RecipeWarning(f"training.eval_generate={recipe.training.eval_generate} has no effect with "
                                    "training.eval_interval=0 (no evaluation runs); set training.eval_interval"))
    return errors


def _tokenizer_spec(recipe: Recipe, role: str) -> tuple[str, Optional[str]]:
    """``(recipe key, spec)`` of the tokenizer whose ids feed ``role``'s embedding (spec None: no tokenizer)."""
    data = recipe.data
    if role == "teacher" and data.teacher_tokenizer:
        return "data.teacher_tokenizer", data.teacher_tokenizer
    if data.tokenizer is None and data.kind == "embedded":
        return "data.tokenizer", f"embedded:{DEFAULT_VOCAB_SIZE}"
    return "data.tokenizer", data.tokenizer


def _tokenizer_size(spec: str) -> Optional[int]:
    """Token ids of a tokenizer spec (``embedded:N`` is N, read without training it); None when unknown here.

    Raises:
        InputError: the tokenizer exists but cannot be loaded.
    """
    if spec.startswith("embedded:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError:
            return None  # the run's loader reports the malformed spec
    if not os.path.exists(os.path.expanduser(spec)):
        return None
    return load_tokenizer(spec).vocab_size


def tokenizer_vocab_errors(recipe: Recipe, vocab_sizes: dict[str, Optional[int]]) -> list[str]:
    """Errors for a tokenizer with more token ids than the model it feeds.

    A token id ``>= vocab_size`` has no embedding row: the run dies with an
    ``IndexError``, or, when megatron's padded vocabulary happens to cover the
    id, reads an untrained padding row and every step turns non-finite. Checked
    for the student against ``data.tokenizer`` and for the teacher against
    ``data.teacher_tokenizer`` (else ``data.tokenizer``), whenever the data is
    read through a tokenizer (not ``data.kind: synthetic``).

    Args:
        recipe: the recipe.
        vocab_sizes: ``{"student": V_s, "teacher": V_t}`` as the run will use
            them (None when unknown: that side is not checked).

    Returns:
        One message per model naming both sizes and the fix; a
        :class:`RecipeWarning` when a tokenizer path does not exist here.
    """
    if recipe.data.kind == "synthetic":
        return []
    errors: list[str] = []
    sizes: dict[str, Optional[int]] = {}
    for role in ("student", "teacher"):
        vocab = vocab_sizes.get(role)
        key, spec = _tokenizer_spec(recipe, role)
        if vocab is None or spec is None:
            continue
        if spec not in sizes:
            try:
                sizes[spec] = _tokenizer_size(spec)
            except InputError as exc:
                errors.append(f"{key}: {exc}")
                sizes[spec] = None
                continue
            if sizes[spec] is None and not spec.startswith("embedded:"):
                errors.append(RecipeWarning(f"{key}={spec!r} not found on this machine; its size is not checked "
                                            f"against {role}.vocab_size"))
        size = sizes[spec]
        if size is not None and size > vocab:
            errors.append(f"{key}={spec!r} has {size} tokens but {role}.vocab_size={vocab}: token ids {vocab}.."
                          f"{size - 1} have no embedding row in the {role}; use the {role}'s own tokenizer, or a "
                          f"{role} whose vocab_size is at least {size}")
    return errors


def _resume_errors(recipe: Recipe) -> list[str]:
    """``checkpoint.resume`` names a path (not ``auto``/``none``) that does not exist, or is not a directory."""
    resume = recipe.checkpoint.resume
    if resume in ("auto", "none"):
        return []
    path = os.path.expanduser(resume)
    if not os.path.exists(path):
        return [f"checkpoint.resume={resume!r}: no such checkpoint directory; give an existing step_N directory "
                "(or a directory of them), `auto` (latest checkpoint under checkpoint.dir, if any) or `none`"]
    if not os.path.isdir(path):
        return [f"checkpoint.resume={resume!r} is a file, not a checkpoint directory (step_N/)"]
    return []


def sequence_errors(recipe: Recipe, source_cls: type, aligner_cls: Optional[type] = None) -> list[str]:
    """Recipes a generating sequence source cannot run (docs/sequences.md, "In the engine").

    A source whose class sets ``generates`` reads the prompts of instruction data
    (``data.kind: instruct``); one that sets ``samples_teacher`` needs a teacher
    (``loss.kd_weight > 0``); the teacher must be co-located (not
    ``teacher_parallel``: its ranks read the data's responses themselves), and one
    tokenizer must serve both models (re-tokenizing generated text for a
    cross-tokenizer aligner is not implemented). The engine applies the same rule
    when it builds the run (:class:`distill_plugins.engine.sequences.SequenceRuntime`).
    """
    if not getattr(source_cls, "generates", False):
        return []
    name, data = recipe.sequences.name, recipe.data
    errors = []
    if data.kind != "instruct":
        errors.append(f"sequences: {name!r} generates responses from the prompts of the batch, but data.kind="
                      f"{data.kind!r} has no prompts; use instruction data (data.kind: instruct, docs/data.md) or "
                      "sequences: dataset")
    if getattr(source_cls, "samples_teacher", False) and recipe.loss.kd_weight == 0:
        errors.append(f"sequences: {name!r} samples responses from the teacher, but loss.kd_weight=0 builds no "
                      "teacher; set loss.kd_weight > 0 or use a source that samples the student (on_policy, mixed)")
    if recipe.teacher_parallel is not None:
        errors.append(f"sequences: {name!r} generates responses, but teacher_parallel puts the teacher on ranks "
                      "of its own, which read the data's responses themselves; remove teacher_parallel or use "
                      "sequences: dataset")
    two = data.teacher_tokenizer and data.teacher_tokenizer != data.tokenizer
    if aligner_cls is not None and getattr(aligner_cls, "cross_tokenizer", False) and two:
        errors.append(f"sequences: {name!r} generates responses, but data.teacher_tokenizer="
                      f"{data.teacher_tokenizer!r} differs from data.tokenizer: re-tokenizing generated text for "
                      "the teacher's cross-tokenizer aligner is not implemented; use one tokenizer or "
                      "sequences: dataset")
    return errors


def _reference_errors(recipe: Recipe) -> list[str]:
    """A selector that reads a reference model (AdaSPEC) needs ``reference:`` on the student's vocabulary."""
    name = recipe.selector.name
    ref = recipe.reference
    if ref is None:
        return [f"selector {name!r} compares the student with a frozen reference model: add a `reference:` section "
                "(the student's architecture distilled beforehand, e.g. reference: {hf: /models/draft-ref})"]
    s_vocab = recipe.student.vocab_size
    if ref.vocab_size is not None and s_vocab is not None and ref.vocab_size != s_vocab:
        return [f"reference.vocab_size={ref.vocab_size} differs from student.vocab_size={s_vocab}: the reference "
                f"model of selector {name!r} reads the student's tokens and vocabulary"]
    return []


def fused_output_layer_errors(recipe: Recipe, part_configs: dict[str, tuple[type, Any]]) -> list:
    """``loss.fused_output_layer``: ``true`` with a part or setting the fused path cannot run is one error;
    ``auto`` falling back is a :class:`RecipeWarning` with the notice the engine logs at run time.

    The rule is :func:`distill_plugins.objectives.fused.decide_fused_output_layer`, the one
    the engine applies when it builds the run. The parts are built from their checked configs.
    """
    setting = recipe.loss.fused_output_layer
    if setting is False:
        return []
    built = {}
    for section in ("objective", "selector", "temperature"):
        if section not in part_configs:
            return []  # that section's own error is already reported
        cls, config = part_configs[section]
        built[section] = part = cls(config)
        part.name = getattr(recipe, section).name
    parts = SimpleNamespace(kd_weight=recipe.loss.kd_weight, **built)
    decision = decide_fused_output_layer(setting, parts, aligner=recipe.aligner.name,
                                         separate_teacher=recipe.teacher_parallel is not None)
    if decision.error:
        return [decision.error]
    return [RecipeWarning(decision.notice)] if decision.notice else []


def _best_effort_recipe(prepared: dict[str, Any]) -> Recipe:
    """A recipe of the sections that parse on their own (defaults elsewhere), for structure checks.

    Lets validation report structural problems of good sections even when another section is broken.
    """
    kept = {}
    for key, value in prepared.items():
        obj, errs = parse_dataclass(Recipe, {key: value}, "recipe")
        if obj is not None and not errs:
            kept[key] = value
    obj, _ = parse_dataclass(Recipe, kept, "recipe")
    return obj if obj is not None else Recipe()


def _hook_view(recipe: Recipe, part_configs: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """What ``distill_validate_recipe`` receives: plain data, part params as checked Config fields."""
    plain = to_plain(recipe)
    for section, (_, config) in part_configs.items():
        plain[section] = {"name": plain[section]["name"], "params": to_plain(config)}
    return plain


def validate_recipe_data(data: dict[str, Any], host=None, source: str = "recipe"):
    """Validate merged recipe data. Returns ``(Recipe, PluginHost)``; raises :class:`RecipeError`."""
    errors: list[str] = []
    prepared = split_parts(data, errors)
    if host is None:
        plugins = prepared.get("plugins", [])
        try:
            host = build_plugin_host(plugins if isinstance(plugins, list) else [])
        except DistillError as exc:
            raise RecipeError(errors + [f"plugins: {exc}"]) from exc

    recipe, schema_errors = parse_recipe(prepared)
    errors.extend(schema_errors)

    part_configs = {}
    params_checked = recipe is not None and not errors  # schema (and part names) passed so far
    for section, kind in PART_SECTIONS.items():
        spec = prepared.get(section)
        if not isinstance(spec, dict) or "name" not in spec:
            if recipe is not None:
                spec = to_plain(getattr(recipe, section))
            else:
                continue
        name, params = spec["name"], spec.get("params", {})
        if name in PART_PLACEHOLDERS.get(section, ()):
            if params:
                errors.append(f"{section}: {name!r} takes no parameters, got {sorted(params)}")
            continue
        config, part_errors = host.registry(kind).check_params(name, params, section)
        errors.extend(part_errors)
        params_checked = params_checked and not part_errors
        if config is not None:
            part_configs[section] = (host.part_class(kind, name), config)

    checked = recipe if recipe is not None else _best_effort_recipe(prepared)
    if checked.aligner.name == "auto":
        checked = resolve_aligner(checked)  # the run gets the resolved recipe: auto is resolved once
        recipe = checked if recipe is not None else None
        resolved = checked.aligner.name
        config, part_errors = host.registry("vocab_aligner").check_params(resolved, {}, "aligner")
        errors.extend(part_errors)
        params_checked = params_checked and not part_errors
        if config is not None:
            part_configs["aligner"] = (host.part_class("vocab_aligner", resolved), config)
    for section, (cls, config) in part_configs.items():
        check = getattr(cls, "check_recipe", None)
        if check is not None:
            # aligners check their objective against this host's registry (they build no host of their own)
            kw = {"objectives": host.names("objective")} if section == "aligner" else {}
            errors.extend(type(e)(f"{section}: {e}") for e in check(config, checked, **kw))
    selector = part_configs.get("selector")
    if selector is not None and getattr(selector[0], "needs_reference_model", False):
        errors.extend(_reference_errors(checked))
    vocab_sizes: dict[str, Optional[int]] = {}
    errors.extend(_structure_errors(checked, vocab_sizes))
    errors.extend(tokenizer_vocab_errors(checked, vocab_sizes))
    if "sequences" in part_configs:
        aligner_cls = part_configs["aligner"][0] if "aligner" in part_configs else None
        errors.extend(sequence_errors(checked, part_configs["sequences"][0], aligner_cls))
    errors.extend(_resume_errors(checked))
    errors.extend(fused_output_layer_errors(checked, part_configs))
    if params_checked:
        errors.extend(host.validate_recipe(_hook_view(checked, part_configs)))
    warnings = [e for e in errors if isinstance(e, RecipeWarning)]
    errors = [e for e in errors if not isinstance(e, RecipeWarning)]
    for warning in warnings:
        log.warning("%s: %s", source, warning)
    if errors:
        raise RecipeError(errors)
    return recipe, host
