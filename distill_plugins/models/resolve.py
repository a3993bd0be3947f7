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
they then fall back to the recipe's shape keys with a warning, while ``distill
run`` refuses (it needs the weights). Any other problem (no config.json, an
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

from distill_plugins.models.checkpoint_meta import META_FILE, read_checkpoint_meta
from distill_plugins.models.hf_config import default_family, read_hf_config
from distill_plugins.recipe.schema import ModelSpec

__all__ = ["ResolvedModel", "resolve_model", "resolve_model_spec", "source_kind", "source_missing"]


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
