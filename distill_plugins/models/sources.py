"""Model weights from their sources: the student's and the frozen teacher's (and reference's).

Design
------
Shapes first: :func:`distill_plugins.models.resolve.resolve_model_spec` fills a
spec's shape keys from its source's config file (``hf:`` config.json,
``megatron:`` / ``checkpoint:`` distill_model.json); the engine resolves the
recipe's specs with it before building anything, and :func:`build_teacher`
resolves again (idempotent) so a ``reference:`` section gets the same treatment.
Then weights: :func:`load_model_weights` fills a built model from the spec's
source (``hf:`` through :func:`~distill_plugins.models.hf_import.load_hf_weights`;
``megatron:`` and ``checkpoint:`` through
:func:`~distill_plugins.models.megatron_ckpt.load_megatron_checkpoint`), else a
deterministic random initialisation from the recipe seed. The student is built
by the trainer and loaded here; the frozen models are built, loaded and frozen here.

The teacher is a megatron-core GPTModel built like the student
(:func:`distill_plugins.models.build.build_gpt_model`) on the same TP/PP
groups, split over the same pipeline stages (each stage holds its own share of
the teacher's layers, which may differ from the student's), then frozen:

* ``eval()`` mode and ``requires_grad=False`` on every parameter;
* never wrapped in DDP, never handed to the optimizer (so no optimizer state);
* never part of the student's state dict: :class:`~distill_plugins.engine.stage.DistillStage`
  keeps it outside its module tree, so checkpoints hold the student only.

A frozen model without a source gets the random initialisation, which only
makes sense for tests and dry runs (a warning says so).

Usage::

    teacher = build_teacher(recipe.teacher, recipe.parallel, vocab_size=V, precision="fp32", cpu=True, seed=1)
    assert_frozen(teacher)
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.models import build as models
from distill_plugins.models.hf_import import load_hf_weights
from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint
from distill_plugins.models.resolve import resolve_model_spec
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec

__all__ = ["build_teacher", "freeze", "assert_frozen", "load_model_weights", "parameter_digest"]

log = get_logger(__name__)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode and switch off gradients of every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def assert_frozen(model: torch.nn.Module) -> None:
    """Raise :class:`DistillError` if any parameter requires grad or the model is in train mode."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable or model.training:
        raise DistillError(f"teacher is not frozen: training={model.training}, trainable={trainable[:4]}")


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order (bit-identity checks)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model_weights(model: torch.nn.Module, spec: ModelSpec, *, seed: int, who: str) -> str:
    """Load ``spec``'s weights (hf / megatron / checkpoint / random) into ``model``; returns the source used."""
    if spec.hf:
        load_hf_weights(model, spec.hf)
        return f"hf:{spec.hf}"
    if spec.megatron or spec.checkpoint:
        path = spec.megatron or spec.checkpoint
        load_megatron_checkpoint(model, path)  # dist_checkpointing dir, or a run checkpoint with model_dist/
        return f"{'megatron' if spec.megatron else 'checkpoint'}:{path}"
    models.init_deterministic(model, seed)
    return f"random(seed={seed})"


def build_teacher(spec: ModelSpec, parallel: ParallelSpec, *, vocab_size: int, precision: str = "fp32",
                  cpu: bool = False, seed: int = 1234, use_te: Optional[bool] = None,
                  who: str = "teacher") -> torch.nn.Module:
    """Build, load and freeze this rank's pipeline stage of a frozen model (the teacher, or AdaSPEC's reference).

    ``spec`` is resolved first (:func:`~distill_plugins.models.resolve.resolve_model_spec`), so its
    shape keys come from its source's config file whoever calls this.
    """
    spec = resolve_model_spec(spec)
    teacher = models.build_gpt_model(spec, parallel, vocab_size=vocab_size, precision=precision, cpu=cpu,
                                     use_te=use_te, who=who)
    source = load_model_weights(teacher, spec, seed=seed, who=who)
    if source.startswith("random"):
        log.warning("%s has no weights (%s.hf / %s.megatron / %s.checkpoint unset): using a random %s, which only "
                    "makes sense for tests and dry runs", who, who, who, who, who)
    else:
        log.info("%s weights from %s", who, source)
    return freeze(teacher)
