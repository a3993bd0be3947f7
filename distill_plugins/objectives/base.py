"""Shared machinery of the built-in objectives: input checks, temperatures, chunked kernels.

Design
------
Every built-in objective is a :class:`VocabParallelObjective`. Its ``__call__``
checks the tensors once (shapes, vocabulary size, temperature), then hands the
work to one custom ``torch.autograd.Function`` per family (KL, probability
mixtures, weighted logit gaps). Those functions

* walk the rank's shard in row chunks of about
  :data:`distill_plugins.parallel.DEFAULT_CHUNK_ELEMENTS` fp32 elements, so the
  extra memory is a few chunk-sized temporaries whatever the token count;
* reduce each chunk to per-token local maxima and partial sums, then run one
  MAX and one SUM all-reduce over packed ``[N, k]`` tensors for all tokens
  (:func:`distill_plugins.parallel.merge_partials`);
* save only the inputs and a few ``[N]`` scalars, and recompute the gradient
  slice elementwise, chunk by chunk, in backward, with no communication.

Padded columns (at or past ``vocab_size``) form a suffix of the padded
vocabulary, so on every rank the real columns are a prefix of the shard: the
kernels slice them (``x[:, :width]``) instead of masking, and padded gradient
columns are exactly zero.

Input validation that needs the data (NaN, +inf, a row with no finite real
logit) is folded into the MAX all-reduce as flag columns, so every rank of the
TP group raises the same :class:`~distill_plugins.errors.InputError` together.

Fused output layer: the chunk contract
--------------------------------------
:mod:`distill_plugins.objectives.fused` computes the logits chunk by chunk from
the hidden states (``[R, V_local]`` slices of ``h W^T``, ``R`` whole token rows
of the rank's shard) and calls the objective on each chunk through
:meth:`~distill_plugins.Objective.loss_and_grad`, which returns the chunk's
per-row losses ``[R]`` and ``d(sum_i w_i loss_i) / d student_logits`` for the
given row weights ``w`` (``kd_weight``, times ``tau_i**2`` when the temperature
policy asks for it). Because a chunk holds complete rows, the per-row global
statistics (maxima, sums of exponentials, weighted sums over the whole padded
vocabulary) are complete after the objective's own per-token all-reduces inside
that call; no statistics cross chunks. What an objective promises by setting
``supports_fused_output_layer = True`` is row independence under chunking:

* the loss and gradient of row ``i`` depend only on row ``i`` (and ``tau_i``),
  so calls on the chunks of a partition of the rows equal one call on all rows;
* every TP rank calls it with the same chunks in the same order (collectives
  inside a call are fine: a few fp32 scalars per token, as here);
* it keeps no per-call state (a counter advanced per call would differ between
  the paths).

Every objective here keeps it (:class:`VocabParallelObjective` sets the flag;
TAID sets it too); ``check_objective_contract`` compares the fused path with
the materialised one for any objective that claims it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import Objective, Temperature
from distill_plugins.parallel import DEFAULT_CHUNK_ELEMENTS, finite_shift, group_size, local_real_width, row_chunks

__all__ = [
    "ShardInfo",
    "VocabParallelObjective",
    "Workspace",
    "gradient_buffer",
    "check_flags",
    "check_global_max",
    "check_pair",
    "grad_coefficient",
    "inverse_temperature",
    "row_max",
    "scaled_chunk",
    "scaled_chunk_and_shift",
]


@dataclass(frozen=True)
class ShardInfo:
    """Static facts about one call's shard.

    Attributes:
        n_rows: token rows ``N``.
        v_local: shard width (padded).
        width: real columns in this shard (a prefix; may be 0).
        vocab_size: real vocabulary size over the whole group.
        group: TP group or None.
        chunk_elements: fp32 elements per row chunk.
    """

    n_rows: int
    v_local: int
    width: int
    vocab_size: int
    group: Any
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def chunks(self):
        """Row slices of about ``chunk_elements`` real elements each."""
        return row_chunks(self.n_rows, max(1, self.width), self.chunk_elements)


def check_pair(student: torch.Tensor, teacher: torch.Tensor, group: Any, vocab_size: Optional[int],
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> ShardInfo:
    """Check the tensor contract and describe the shard.

    Raises:
        InputError: not 2-D, shapes differ, not floating point, or a bad ``vocab_size``.
    """
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise InputError(f"student_logits and teacher_logits must be tensors, got {type(student).__name__} "
                         f"and {type(teacher).__name__}")
    if student.shape != teacher.shape:
        raise InputError(f"student_logits shape {tuple(student.shape)} != teacher_logits shape "
                         f"{tuple(teacher.shape)}; both must be [N, V_local] shards of the same padded vocabulary")
    if student.dim() != 2:
        raise InputError(f"logits must be 2-D [N, V_local]; got shape {tuple(student.shape)} "
                         "(flatten the batch and sequence dimensions and drop masked rows first)")
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not x.is_floating_point():
            raise InputError(f"{name} must be floating point, got dtype {x.dtype}")
    if student.shape[1] == 0:
        raise InputError("logits have V_local = 0 columns")
    n, v_local = student.shape
    width = local_real_width(v_local, group, vocab_size)
    real = v_local * group_size(group) if vocab_size is None else int(vocab_size)
    return ShardInfo(n, v_local, width, real, group, chunk_elements)


def inverse_temperature(temperature: Temperature, n_rows: int, device: torch.device) -> Optional[torch.Tensor]:
    """``1 / temperature`` as an fp32 ``[N]`` tensor, or None when the temperature is exactly 1.

    Raises:
        InputError: a non-positive or non-finite temperature, or a tensor whose shape is not ``[N]``.
    """
    if isinstance(temperature, torch.Tensor):
        tau = temperature.detach().to(device=device, dtype=torch.float32)
        if tau.dim() == 0:
            tau = tau.expand(n_rows)
        if tau.shape != (n_rows,):
            raise InputError(f"temperature tensor has shape {tuple(temperature.shape)}; expected a scalar or "
                             f"[N] = [{n_rows}] (one temperature per token row)")
        if n_rows and not bool(torch.isfinite(tau).all() and (tau > 0).all()):
            bad = tau[~(torch.isfinite(tau) & (tau > 0))][0].item()
            raise InputError(f"temperature must be finite and > 0 for every token; got {bad}")
        return 1.0 / tau
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a float or a [N] tensor, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"temperature must be finite and > 0, got {value}")
    if value == 1.0:
        return None
    return torch.full((n_rows,), 1.0 / value, dtype=torch.float32, device=device)


def scaled_chunk(x: torch.Tensor, rows: slice, width: int, inv_tau: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``x[rows, :width] / tau`` for a row chunk (a view when no cast or scale is needed; never mutate it)."""
    c = x[rows, :width].float()
    if inv_tau is not None:
        c = c * inv_tau[rows].unsqueeze(1)
    return c


def row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima ``[r]`` of a ``[r, w]`` chunk; -inf for a chunk with no columns (``amax`` refuses those)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), float("-inf"))
    return x.amax(dim=1)


def scaled_chunk_and_shift(x: torch.Tensor, rows: slice, width: int,
                           inv_tau: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How every forward pass opens a chunk: ``(c, m, s)``.

    ``c`` is :func:`scaled_chunk` (fp32, real columns only, divided by tau; never
    mutate it), ``m`` its local row maxima and ``s = finite_shift(m)`` the shift to
    subtract before exponentiating. Only ``[r]`` vectors are added to the chunk.
    """
    c = scaled_chunk(x, rows, width, inv_tau)
    m = row_max(c)
    return c, m, finite_shift(m)


def grad_coefficient(grad_loss: torch.Tensor, inv_tau: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[N]`` factor of every backward: ``grad_loss / tau`` (the chain rule through ``f / tau``)."""
    return grad_loss.float() if inv_tau is None else grad_loss.float() * inv_tau


class Workspace:
    """``k`` reusable fp32 chunk buffers for a kernel's temporaries (no allocation per chunk)."""

    def __init__(self, info: ShardInfo, k: int, device: torch.device):
        rows = min(info.n_rows, max(1, info.chunk_elements // max(1, info.width)))
        self.buffers = [torch.empty((rows, info.width), dtype=torch.float32, device=device) for _ in range(k)]

    def get(self, i: int, rows: slice) -> torch.Tensor:
        """Buffer ``i`` sized for the row chunk ``rows``."""
        return self.buffers[i][: rows.stop - rows.start]


def gradient_buffer(student: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Uninitialised gradient of the student's shape and dtype, with padded columns zeroed.

    The kernels write every real column, so only the padding needs a fill.
    """
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if info.width < info.v_local:
        grad[:, info.width:] = 0
    return grad


def nan_flags(*local_maxes: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` 0/1 flags: which local maxima are NaN (``amax`` propagates NaN)."""
    return torch.stack([torch.isnan(m) for m in local_maxes], dim=1).float()


def check_flags(flags: Optional[torch.Tensor], names: tuple[str, ...]) -> None:
    """Raise when any all-reduced NaN flag is set, naming the tensor.

    Raises:
        InputError: ``flags[:, j]`` is set for some row; ``names[j]`` names the tensor.
    """
    if flags is None or flags.numel() == 0:
        return
    bad = flags > 0
    if bool(bad.any()):
        for j, name in enumerate(names):
            rows = torch.nonzero(bad[:, j]).flatten()
            if rows.numel():
                raise InputError(f"{name} contains NaN (first at token row {rows[0].item()}, "
                                 f"{rows.numel()} row(s) affected); check the model outputs for overflow")


def check_global_max(global_max: torch.Tensor, names: tuple[str, ...]) -> None:
    """Raise on rows whose real logits are all -inf, or that contain +inf.

    Raises:
        InputError: naming the tensor and the first offending row.
    """
    if global_max.numel() == 0:
        return
    if bool(torch.isfinite(global_max).all()):
        return
    for j, name in enumerate(names):
        col = global_max[:, j]
        rows = torch.nonzero(col == float("-inf")).flatten()
        if rows.numel():
            raise InputError(f"{name} row {rows[0].item()} is -inf in every real vocabulary column "
                             f"({rows.numel()} such row(s)); a distribution needs at least one finite logit. "
                             "Drop such rows (label -100) before the loss")
        rows = torch.nonzero(col == float("inf")).flatten()
        if rows.numel():
            raise InputError(f"{name} contains +inf (first at token row {rows[0].item()}); logits must be < +inf")


class VocabParallelObjective(Objective):
    """Base of the built-in objectives: validates the call, then runs :meth:`forward_kernel`.

    Subclasses implement ``forward_kernel(student, teacher, inv_tau, info) -> Tensor[N]``.

    Tensor contract (all built-ins):
        * ``student_logits``, ``teacher_logits``: ``[N, V_local]``, any float dtype,
          the rank's contiguous slice of the padded vocabulary (sharded over ``tp_group``).
        * ``temperature``: float or ``[N]`` tensor, > 0; both logits are divided by it.
        * ``vocab_size``: real vocabulary; columns at or past it are padding and are
          excluded from every softmax, mean and count.
        * returns fp32 ``[N]`` per-token losses (no reduction over tokens), identical on
          every TP rank, differentiable with respect to ``student_logits`` only; the
          gradient has the student's dtype and is exactly 0 on padded columns.
    """

    #: fp32 elements per row chunk; lower it to trade speed for memory.
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    #: rows are independent (module docstring, "the chunk contract"): runs on the fused output layer.
    supports_fused_output_layer = True

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 temperature: Temperature = 1.0, tp_group: Any = None,
                 vocab_size: Optional[int] = None) -> torch.Tensor:
        info = check_pair(student_logits, teacher_logits, tp_group, vocab_size, self.chunk_elements)
        inv_tau = inverse_temperature(temperature, info.n_rows, student_logits.device)
        if info.n_rows == 0:
            return student_logits.float().sum(dim=-1)  # empty [0], still attached to the graph
        return self.forward_kernel(student_logits, teacher_logits.detach(), inv_tau, info)

    def forward_kernel(self, student: torch.Tensor, teacher: torch.Tensor, inv_tau: Optional[torch.Tensor],
                       info: ShardInfo) -> torch.Tensor:
        raise NotImplementedError
