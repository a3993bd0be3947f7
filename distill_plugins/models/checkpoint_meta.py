"""``distill_model.json``: the shape record saved beside megatron checkpoints, read without torch.

Design
------
A megatron ``dist_checkpointing`` directory holds tensors, not the model's shape.
Beside the weights, :func:`distill_plugins.models.megatron_ckpt.save_megatron_checkpoint`
and every run checkpoint of the engine write ``distill_model.json``
(:class:`CheckpointMeta`): the :class:`~distill_plugins.recipe.schema.ModelSpec`, the
real and padded vocabulary, the layout and precision it was saved with, and the HF
family to export to. ``megatron:`` and ``checkpoint:`` model specs
(:mod:`distill_plugins.models.resolve`), ``distill check``, ``distill plan`` and
``distill export`` read only this file to learn the shape. The module imports
neither torch nor megatron-core.

Accepted directories: a ``dist_checkpointing`` directory (``metadata.json`` +
``*.distcp`` / ``common.pt``), or a distill_plugins run checkpoint (``step_N/``)
that holds one in ``model_dist/``; the file is looked up in the directory given,
then in its ``model_dist/``.

Checkpoints written by Megatron-LM's ``pretrain_gpt.py`` have no
``distill_model.json``; write one by hand (format below, docs/models.md) to use them::

    {"format": 1, "spec": {"arch": "llama", "num_layers": 2, ...}, "vocab_size": 32000,
     "padded_vocab_size": 32000, "make_vocab_size_divisible_by": 128,
     "tensor": 1, "pipeline": 1, "precision": "bf16", "family": "llama"}

Usage::

    spec = read_checkpoint_spec("ckpt/teacher")     # ModelSpec with vocab_size set
    meta = read_checkpoint_meta("runs/x/checkpoints/step_100")
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from distill_plugins.config import parse_dataclass
from distill_plugins.errors import DistillError
from distill_plugins.recipe.schema import ModelSpec

__all__ = ["META_FILE", "CheckpointMeta", "read_checkpoint_meta", "read_checkpoint_spec", "resolve_checkpoint_dir",
           "write_meta_file"]

META_FILE = "distill_model.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """What ``distill_model.json`` records.

    Attributes:
        spec: the model spec (shape keys; ``hf``/``megatron``/``checkpoint`` cleared).
        vocab_size: real vocabulary.
        padded_vocab_size: embedding rows as saved.
        make_vocab_size_divisible_by: the divisor used for padding.
        tensor, pipeline: layout it was saved with (informational).
        precision: ``fp32``/``bf16``/``fp16`` of the saved parameters.
        family: HF family to export to (``llama``, ``mistral``, ``qwen2``, ``gpt2``) if known.
    """

    spec: ModelSpec
    vocab_size: int
    padded_vocab_size: int
    make_vocab_size_divisible_by: int = 128
    tensor: int = 1
    pipeline: int = 1
    precision: str = "fp32"
    family: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        spec = {f.name: getattr(self.spec, f.name) for f in dataclasses.fields(self.spec)}
        spec.update(hf=None, megatron=None, checkpoint=None)
        return {"format": 1, "spec": spec, "vocab_size": self.vocab_size, "padded_vocab_size": self.padded_vocab_size,
                "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by, "tensor": self.tensor,
                "pipeline": self.pipeline, "precision": self.precision, "family": self.family}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "CheckpointMeta":
        """Parse ``data`` read from ``where``.

        Raises:
            DistillError: not an object, an invalid spec, or a missing/ill-typed key (named).
        """
        if not isinstance(data, dict):
            raise DistillError(f"{where}: expected a JSON object, got {type(data).__name__}")
        spec, errors = parse_dataclass(ModelSpec, data.get("spec", {}), f"{where}: spec")
        if errors:
            raise DistillError(f"{where}: invalid model spec: " + "; ".join(errors))
        try:
            return cls(spec=spec, vocab_size=int(data["vocab_size"]), padded_vocab_size=int(data["padded_vocab_size"]),
                       make_vocab_size_divisible_by=int(data.get("make_vocab_size_divisible_by", 128)),
                       tensor=int(data.get("tensor", 1)), pipeline=int(data.get("pipeline", 1)),
                       precision=str(data.get("precision", "fp32")), family=data.get("family"))
        except KeyError as exc:
            raise DistillError(f"{where}: missing key {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise DistillError(f"{where}: {exc}") from exc


def resolve_checkpoint_dir(path: str) -> str:
    """The ``dist_checkpointing`` directory for ``path`` (itself, or its ``model_dist/``).

    Raises:
        DistillError: ``path`` is neither.
    """
    if not os.path.isdir(path):
        raise DistillError(f"megatron checkpoint {path!r} does not exist")
    sub = os.path.join(path, "model_dist")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(path, "metadata.json")) and any(
            n.endswith(".distcp") or n == "common.pt" for n in os.listdir(path)):
        return path
    raise DistillError(f"{path!r} is not a megatron dist_checkpointing directory (no metadata.json + *.distcp) "
                       "and has no model_dist/ subdirectory")


def read_checkpoint_meta(path: str) -> CheckpointMeta:
    """Read ``distill_model.json`` of a checkpoint (the dist directory or its parent run checkpoint).

    Reads no weights.

    Raises:
        DistillError: the directory does not exist, has no ``distill_model.json``, or the file is invalid.
    """
    if not os.path.isdir(path):
        raise DistillError(f"checkpoint directory {path!r} does not exist")
    candidates = [os.path.join(path, META_FILE), os.path.join(path, "model_dist", META_FILE)]
    for cand in candidates:
        if os.path.isfile(cand):
            with open(cand, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DistillError(f"{cand}: not valid JSON: {exc}") from exc
            return CheckpointMeta.from_json(data, cand)
    raise DistillError(f"checkpoint {path!r} has no {META_FILE}: it was not written by distill_plugins "
                       "(save_megatron_checkpoint or a run checkpoint); add the file by hand "
                       "(see docs/models.md) so its shape is known")


def read_checkpoint_spec(path: str) -> ModelSpec:
    """The :class:`ModelSpec` saved with a checkpoint (``vocab_size`` set to the real vocabulary)."""
    meta = read_checkpoint_meta(path)
    return dataclasses.replace(meta.spec, vocab_size=meta.vocab_size)


def write_meta_file(meta: CheckpointMeta, path: str) -> str:
    """Write ``meta`` as ``<path>/distill_model.json`` (atomically: a temporary file, then a rename)."""
    target = os.path.join(path, META_FILE)
    with open(target + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(meta.to_json(), fh, indent=2)
    os.replace(target + ".tmp", target)
    return target
