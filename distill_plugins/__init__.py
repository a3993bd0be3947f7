"""distill_plugins: plugin-based knowledge distillation for megatron-core.

Public API (exactly ``__all__``): the hook marker for plugins, the part base
classes, the error types, the plugin host builder, ``build_objective`` /
``build_part``, and the vocab-parallel primitives of :mod:`distill_plugins.parallel`
that objectives compose (docs/objectives.md, "Writing your own objective"; they may
be imported from either module). Importing this package imports neither
megatron-core nor any plugin.
"""

from __future__ import annotations

from typing import Any

from .errors import DistillError, InputError, PluginError, RecipeError, UnknownPartError
from .hookspecs import hookimpl
from .interfaces import (
    AlignerInputs,
    AlignerOutput,
    Objective,
    Part,
    PartConfig,
    SamplingParams,
    Selection,
    SequencePlan,
    SequenceSource,
    StepStats,
    TemperaturePolicy,
    TokenContext,
    TokenSelector,
    VocabAligner,
)
from .manager import DEFAULT_PLUGINS, PluginHost, build_plugin_host
from .parallel import (
    ParallelContext,
    all_reduce_max,
    all_reduce_max_packed,
    all_reduce_sum,
    all_reduce_sum_,
    all_reduce_sum_for_shards,
    finite_shift,
    local_real_width,
    merge_partials,
    real_column_mask,
    rescale_partials_,
    row_chunks,
    vocab_parallel_expectation,
    vocab_parallel_log_softmax,
    vocab_parallel_logsumexp,
    vocab_parallel_softmax,
    vocab_parallel_sum,
)

__version__ = "0.1.0"


def build_objective(name: str, **params: Any) -> Objective:
    """Build a registered objective by name with checked parameters.

    Returns a callable ``objective(student_logits [T, V_local], teacher_logits
    [T, V_local], *, temperature=1.0, tp_group=None, vocab_size=None) -> Tensor[T]``
    of per-token fp32 losses (see :class:`Objective`).

    Raises:
        UnknownPartError: ``name`` is not registered (the message lists those that are).
        RecipeError: a parameter is unknown, ill-typed or out of range.
    """
    return build_plugin_host().build("objective", name, params)  # type: ignore[return-value]


def build_part(kind: str, name: str, **params: Any) -> Part:
    """Build a registered part of ``kind`` (objective, token_selector, temperature_policy, vocab_aligner)."""
    return build_plugin_host().build(kind, name, params)


__all__ = [
    "DEFAULT_PLUGINS",
    "DistillError",
    "InputError",
    "Objective",
    "ParallelContext",
    "Part",
    "PartConfig",
    "PluginError",
    "PluginHost",
    "RecipeError",
    "Selection",
    "StepStats",
    "TemperaturePolicy",
    "TokenContext",
    "TokenSelector",
    "UnknownPartError",
    "VocabAligner",
    "SequenceSource",
    "SequencePlan",
    "SamplingParams",
    "AlignerInputs",
    "AlignerOutput",
    "__version__",
    "all_reduce_max",
    "all_reduce_max_packed",
    "all_reduce_sum",
    "all_reduce_sum_",
    "all_reduce_sum_for_shards",
    "build_objective",
    "build_part",
    "build_plugin_host",
    "finite_shift",
    "hookimpl",
    "local_real_width",
    "merge_partials",
    "real_column_mask",
    "rescale_partials_",
    "row_chunks",
    "vocab_parallel_expectation",
    "vocab_parallel_log_softmax",
    "vocab_parallel_logsumexp",
    "vocab_parallel_softmax",
    "vocab_parallel_sum",
]
