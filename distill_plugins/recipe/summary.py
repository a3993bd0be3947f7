"""Human-readable summary of a validated recipe, printed by ``distill check``.

Model lines come from :func:`distill_plugins.models.model_info.describe_model`,
which reads only config files (``hf:`` config.json, ``megatron:`` metadata) and
reports family, shape, parameter count and the padded vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from distill_plugins.errors import DistillError
from distill_plugins.models.model_info import describe_model
from distill_plugins.models.resolve import source_missing
from distill_plugins.recipe.schema import Recipe


def _model_line(role: str, spec, recipe: Recipe) -> str:
    try:
        return describe_model(spec, recipe.parallel, role=role).summary()
    except DistillError as exc:
        if source_missing(spec) is None:
            raise  # a config that exists but is refused: validation reports it first, as distill run would
        # the model directory is absent on this machine (a cluster recipe checked on a laptop): the recipe's keys
        inline = dataclasses.replace(spec, hf=None, megatron=None, checkpoint=None)
        return f"{describe_model(inline, recipe.parallel, role=role).summary()} [from the recipe: {exc}]"


def _part(spec) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
    return f"{spec.name}({params})" if params else spec.name


def describe_recipe(recipe: Recipe, host) -> Iterator[str]:
    """Lines describing the models, layout, parts and plugins of ``recipe``."""
    if recipe.description:
        yield recipe.description.strip()
    for role in ("student", "teacher", "reference"):
        spec = getattr(recipe, role)
        if spec is not None:
            yield _model_line(role, spec, recipe)
    p = recipe.parallel
    yield f"layout: TP={p.tensor} PP={p.pipeline} (DP = world size / {p.tensor * p.pipeline}), device={recipe.device}"
    if recipe.teacher_parallel is not None:  # docs/separate_teacher.md
        t = recipe.teacher_parallel
        yield (f"teacher on its own ranks: the last {t.ranks} processes, TP={t.tensor} PP={t.pipeline} "
               f"DP={t.ranks // (t.tensor * t.pipeline)}; the student's DP = (world size - {t.ranks}) / "
               f"{p.tensor * p.pipeline}")
    t = recipe.training
    yield (f"training: {t.steps} steps, global batch {t.global_batch_size}, micro batch {t.micro_batch_size}, "
           f"seq {recipe.data.seq_length}, lr {t.lr}")
    yield (f"parts: objective={_part(recipe.objective)} selector={_part(recipe.selector)} "
           f"temperature={_part(recipe.temperature)} aligner={_part(recipe.aligner)} sequences={_part(recipe.sequences)}")
    yield f"plugins: {', '.join(host.plugin_lines())}"
