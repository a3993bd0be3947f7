"""Where a model's shape comes from: ``hf:``, ``megatron:``, ``checkpoint:`` or the recipe's keys.

Design
------
A recipe model section (:class:`~distill_plugins.recipe.schema.ModelSpec`) names at
most one weight source. :func:`resolve_model` reads that source's config file and
returns the spec with its shape keys filled in, plus the HF family and a label:

* ``hf: <dir>``: ``<dir>/config.json`` through the one HF-config parser
  (:func:`~distill_plugins.models.hf_config.read_hf_config`: every refusal of the
  importer applies here too);
* ``megatron: <dir>`` and ``checkpoint: <dir>`` (a run checkpoint's ``step_N/``):
  the ``distill_model.json`` saved beside the weights
  (:func:`~distill_plugins.models.checkpoint_meta.read_checkpoint_meta`);
* none: the recipe's own shape keys (``inline``).

The recipe's non-shape keys are kept; the shape keys of a checkpoint win over the
recipe's. Reads no weights and imports neither torch nor megatron-core, so
``distill plan``, ``distill check`` (:mod:`distill_plugins.models.model_info`) and
``distill run`` (spec resolution before any model is built) call the same function.

:func:`source_missing` tells the planner and ``distill check`` that a source
directory does not exist on this machine (a cluster recipe checked on a laptop):
they then fall back to the recipe's shape keys with a warning
(:func:`resolve_or_fallback`, their one rule), while ``distill run`` refuses (it
needs the weights). Any other problem (no config.json, an
unsupported ``model_type``, no ``distill_model.json``) is an error everywhere.

Usage::

    resolved = resolve_model(recipe.student)   # ResolvedModel(spec, family, source, config_file, notes)
    spec = resolve_model_spec(recipe.teacher)  # just the spec
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.models.checkpoint_meta import META_FILE, read_checkpoint_meta
from distill_plugins.models.hf_config import default_family, read_hf_config
from distill_plugins.recipe.schema import ModelSpec

__all__ = ["ResolvedModel", "resolve_model", "resolve_model_spec", "resolve_or_fallback", "source_kind",
           "source_missing"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec with its shape read from its source.

    Attributes:
        spec: the spec, shape keys filled from the source (``vocab_size`` set for checkpoints).
        family: ``llama``, ``mistral``, ``qwen2`` or ``gpt2`` (inline specs: from ``arch`` and ``add_qkv_bias``).
        source: ``hf:<dir>``, ``megatron:<dir>``, ``checkpoint:<dir>`` or ``inline``.
        config_file: the file the shape was read from (``None`` for inline specs).
        notes: settings accepted with a caveat (e.g. an HF sliding window), one sentence each.
    """

    spec: ModelSpec
    family: str
    source: str
    config_file: Optional[str] = None
    notes: tuple[str, ...] = ()


def source_kind(spec: ModelSpec) -> Optional[tuple[str, str]]:
    """``(kind, path)`` of the spec's weight source (``hf``, ``megatron``, ``checkpoint``), or ``None``."""
    for kind in ("hf", "megatron", "checkpoint"):
        path = getattr(spec, kind)
        if path:
            return kind, path
    return None


def source_missing(spec: ModelSpec) -> Optional[str]:
    """The source directory when it does not exist on this machine, else ``None``."""
    found = source_kind(spec)
    if found is None:
        return None
    path = os.path.expanduser(found[1])
    return None if os.path.isdir(path) else found[1]


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Read ``spec``'s source config and fill in its shape keys (see the module docstring).

    Raises:
        DistillError: the source directory does not exist, or its config file is
            missing, invalid or describes a model the toolkit cannot load (the
            message names the file and the key).
    """
    found = source_kind(spec)
    if found is None:
        return ResolvedModel(spec=spec, family=default_family(spec), source="inline")
    kind, path = found
    if kind == "hf":
        arch = read_hf_config(os.path.expanduser(path))
        resolved = dataclasses.replace(arch.to_model_spec(spec), hf=path)
        return ResolvedModel(spec=resolved, family=arch.family, source=f"hf:{path}",
                             config_file=os.path.join(path, "config.json"), notes=arch.notes)
    meta = read_checkpoint_meta(os.path.expanduser(path))
    saved = dataclasses.replace(meta.spec, vocab_size=meta.vocab_size, hf=None, megatron=None, checkpoint=None)
    resolved = dataclasses.replace(saved, **{kind: path})
    config_file = os.path.join(path, META_FILE)
    if not os.path.isfile(os.path.expanduser(config_file)):
        config_file = os.path.join(path, "model_dist", META_FILE)
    return ResolvedModel(spec=resolved, family=meta.family or default_family(resolved), source=f"{kind}:{path}",
                         config_file=config_file)


def resolve_model_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its shape keys filled from its checkpoint's config file (:func:`resolve_model`)."""
    return resolve_model(spec).spec


def resolve_or_fallback(role: str, spec: ModelSpec, warnings: list[str]) -> tuple[ModelSpec, str]:
    """``spec``'s shape from its source when the directory exists here, else the recipe's keys.

    The rule of the planner and ``distill check``. Returns the spec and where its shape
    was read: the source's config file, or ``"recipe"``. Appends ``<role>: model
    directory X not found; using the shape keys from the recipe`` to ``warnings`` when
    it falls back, and the source's notes (an HF sliding window) when it does not.

    Raises:
        RecipeError: the source's config is missing, invalid or refused (the same
            message as ``distill run``'s, prefixed with ``<role>.<kind>``), or the recipe
            gives no vocab_size and there is no config to read it from.
    """
    missing = source_missing(spec)
    if missing is not None:
        warnings.append(f"{role}: model directory {missing} not found; using the shape keys from the recipe")
    elif source_kind(spec) is not None:
        try:
            model = resolve_model(spec)
        except DistillError as exc:
            raise RecipeError(f"{role}.{source_kind(spec)[0]}: {exc}") from exc
        warnings.extend(f"{role}: {note}" for note in model.notes)
        return model.spec, model.config_file
    if spec.vocab_size is None:
        raise RecipeError(f"{role}.vocab_size is not set: give it in the recipe (the tokenizer's size) "
                          f"so the planner can size the embedding and the logits")
    return spec, "recipe"
