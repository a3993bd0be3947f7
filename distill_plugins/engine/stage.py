"""Student and frozen teacher under one megatron pipeline schedule.

Design
------
megatron's non-interleaved 1F1B schedule sends one tensor ``[s, b, h]`` between
stages. :class:`DistillStage` wraps this rank's student stage and teacher stage
so that tensor carries both models' hidden states, concatenated along the
hidden dimension: ``[s, b, h_student + h_teacher]``.

* ``set_input_tensor(x)`` (called by the schedule on non-first stages) splits
  ``x`` into the student half (keeps its grad, so the schedule can send the
  gradient back) and the teacher half (detached).
* ``forward`` runs the teacher stage under ``torch.no_grad()`` and the student
  stage normally. A non-last stage returns ``cat([h_student, h_teacher], -1)``;
  its gradient is non-zero only in the student half. The last stage returns
  ``(student_logits, teacher_logits)``, both ``[b, s, V_local]`` and
  vocab-parallel; the schedule hands them to the loss function.
* The send/receive shape is set with the schedule's ``adjust_tensor_shapes_fn``
  (:func:`pipeline_tensor_shapes`), so the models' own configs stay untouched.
* Different tokenizers: the batch carries ``teacher_tokens`` (same length as the
  student's ``tokens``), and the first stage feeds those to the teacher.
* No teacher (``teacher=None``, a run with ``loss.kd_weight: 0``): the stage is
  the student alone.
* A frozen reference model (AdaSPEC's selector) rides along like the teacher:
  on the student's tokens, under ``no_grad``, its hidden states appended to the
  P2P tensor (``[s, b, h_s + h_t + h_r]``).
* The last stage returns a :class:`StageOutput` (student and teacher logits,
  and when asked for: both output layers' inputs, the reference's logits).
* Fused output layer (``loss.fused_output_layer``, :meth:`DistillStage.fuse_output_layers`):
  on the last stage no model's output layer computes logits. Each model's
  ``output_layer.forward`` is replaced by a tap that, while the stage runs,
  keeps its input (the final hidden states ``[s, b, h]``, after the final norm;
  this rank's sequence shard ``[s/TP, b, h]`` with sequence parallelism, which
  the loss all-gathers) and the weight megatron would have multiplied them by
  (``[V_local, h]``: ``output_layer.weight``, or the shared embedding weight that
  ``GPTModel`` passes with tied embeddings on a single stage, a padded vocabulary
  included), and returns an empty ``[s, b, 0]`` tensor instead of the logits.
  The :class:`StageOutput` then carries hidden states and weights (no logits)
  for :func:`distill_plugins.engine.fused_loss.fused_distill_loss`, whose
  gradients flow into the student's hidden states (and on into the decoder)
  and into the output-layer (or shared embedding) weight, as the output
  layer's own backward would. Outside the stage's forward (generation,
  export) the taps call the original ``forward``.
* Hidden states for aligners that project them (DSKD):
  :meth:`DistillStage.capture_hidden_states` makes the last stage also return
  both output layers' inputs ``[s, b, h]`` (after the final norm), taken by a
  forward pre-hook on each ``output_layer``.
* Trainable aligner modules (DSKD projectors) are attached to the last stage
  with :meth:`DistillStage.attach_aligner_modules` *before* DDP wraps it, so
  their parameters join DDP's buckets, the optimizer and gradient clipping;
  they stay out of ``state_dict()`` (the aligner saves them itself).

The teacher is *not* a registered submodule (it is kept in a plain list), so
``parameters()``, DDP buckets, the optimizer and ``state_dict()`` /
``sharded_state_dict()`` see the student only; the student is the ``module``
attribute, so megatron's ``get_attr_wrapped_model`` unwraps to it
(``shared_embedding_or_output_weight``, ``pre_process``, ...).

Interleaved (virtual) pipeline schedules are rejected: a virtual stage would
have to hold interleaved chunks of two models with different depths.

Usage::

    stage = DistillStage(student, teacher)
    ddp = DistributedDataParallel(student.config, ddp_config, stage)
    losses = forward_backward(ddp, batches, loss_fn, num_microbatches=4, seq_length=32, micro_batch_size=2)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule

from distill_plugins.errors import RecipeError

__all__ = ["DistillStage", "StageOutput", "pipeline_tensor_shapes", "forward_backward", "check_schedule",
           "position_ids_for"]


class StageOutput(NamedTuple):
    """What the last pipeline stage hands the loss function.

    Logits are ``[b, s, V_local]`` (vocab-parallel); hidden states ``[s, b, h]``
    (``[s/TP, b, h]`` with sequence parallelism on the fused path). On the fused
    output layer the logits are None and the hidden states and the output-layer
    weight shards ``[V_local, h]`` are set (the reference's too, when there is one).
    """

    student_logits: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]
    student_hidden: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    reference_logits: Optional[torch.Tensor] = None
    student_weight: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    reference_hidden: Optional[torch.Tensor] = None
    reference_weight: Optional[torch.Tensor] = None

    @property
    def fused(self) -> bool:
        """The output layers ran as taps: hidden states and weights, no logits."""
        return self.student_logits is None and self.student_weight is not None


class _OutputLayerTap:
    """Stands in for a last-stage ``output_layer.forward`` on the fused path (module docstring).

    While ``stage._taps`` is a dict it records ``(input, weight)`` under ``who`` and
    returns an empty ``[s, b, 0]`` tensor; otherwise it calls the original ``forward``.
    """

    def __init__(self, stage: "DistillStage", who: str, layer: torch.nn.Module):
        self.stage, self.who, self.layer, self.original = stage, who, layer, layer.forward

    def __call__(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 runtime_gather_output: Optional[bool] = None):
        taps = self.stage._taps
        if taps is None:
            return self.original(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        taps[self.who] = (input_, weight if weight is not None else self.layer.weight)
        return input_.new_empty(tuple(input_.shape[:-1]) + (0,)), None


class DistillStage(MegatronModule):
    """One pipeline stage holding the student (trainable) and the teacher (frozen).

    Args:
        student: this rank's student GPTModel stage.
        teacher: this rank's teacher GPTModel stage (frozen), or None (CE-only runs).
        reference: this rank's stage of a frozen reference model on the student's
            tokens and vocabulary (AdaSPEC), or None.
    """

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module],
                 reference: Optional[torch.nn.Module] = None):
        super().__init__(config=student.config)
        self.module = student
        self._teacher = [teacher]  # a list hides it from nn.Module registration
        self._reference = [reference]
        self.student_hidden = student.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size if teacher is not None else 0
        self.reference_hidden = reference.config.hidden_size if reference is not None else 0
        # No pre_process/post_process attributes here: megatron's finalize_model_grads
        # looks them up to find the module owning the embeddings, which is the student.
        self.first_stage = student.pre_process
        self.last_stage = student.post_process
        for who, model in (("teacher", teacher), ("reference", reference)):
            if model is not None and (model.pre_process, model.post_process) != (self.first_stage, self.last_stage):
                raise RecipeError(f"student and {who} disagree on first/last pipeline stage")
        self.model_type = getattr(student, "model_type", None)
        self._hidden: Optional[dict] = None  # who -> captured output-layer input, when capturing
        #: the last stage hands hidden states and weights to the loss (fuse_output_layers); setting it False
        #: for a while makes the output layers compute logits again (e.g. evaluation that reads them)
        self.fused = False
        self._tapped = False  # the output layers' forward is a tap (installed once)
        self._taps: Optional[dict] = None  # who -> (output-layer input, weight) during a fused forward

    @property
    def student(self) -> torch.nn.Module:
        return self.module

    @property
    def teacher(self) -> Optional[torch.nn.Module]:
        return self._teacher[0]

    @property
    def reference(self) -> Optional[torch.nn.Module]:
        return self._reference[0]

    @property
    def hidden_size(self) -> int:
        """Width of the tensor sent between stages: student + teacher (+ reference) hidden."""
        return self.student_hidden + self.teacher_hidden + self.reference_hidden

    # -- aligner support ----------------------------------------------------------
    def capture_hidden_states(self) -> None:
        """Make the last stage fill ``StageOutput.student_hidden`` / ``teacher_hidden``.

        Both are ``[s, b, h]`` inputs of each model's output layer (after the
        final norm); the student's keeps its graph.
        """
        if not self.last_stage or self._hidden is not None:
            return
        self._hidden = {}
        for who, model in (("student", self.student), ("teacher", self.teacher)):
            def hook(module, args, who=who):
                self._hidden[who] = args[0]
            model.output_layer.register_forward_pre_hook(hook)

    def fuse_output_layers(self) -> None:
        """Stop the output layers of every model on this (last) stage from computing logits.

        Afterwards the stage's forward returns a :class:`StageOutput` with hidden
        states and output-layer weights and no logits (module docstring, "Fused
        output layer"). A no-op on other stages; idempotent. ``stage.fused = False``
        pauses it (the output layers compute logits again) until it is set back to True.
        """
        if not self.last_stage:
            return
        self.fused = True
        if self._tapped:
            return
        self._tapped = True
        for who, model in (("student", self.student), ("teacher", self.teacher), ("reference", self.reference)):
            if model is not None:
                model.output_layer.forward = _OutputLayerTap(self, who, model.output_layer)

    def attach_aligner_modules(self, modules: list) -> None:
        """Register trainable aligner modules (DSKD projectors) on this stage, before DDP wraps it."""
        self.aligner_modules = torch.nn.ModuleList(modules)

    def output_weight(self, who: str) -> torch.Tensor:
        """This rank's shard ``[V_local, h]`` of ``who``'s output-layer weight (last stage)."""
        model = self.student if who == "student" else self.teacher
        if getattr(model, "share_embeddings_and_output_weights", False):
            return model.shared_embedding_or_output_weight()
        return model.output_layer.weight

    # -- what megatron's schedule calls ----------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "DistillStage takes one pipeline tensor"
            input_tensor = input_tensor[0]
        if input_tensor is None:
            for model in (self.student, self.teacher, self.reference):
                if model is not None:
                    model.set_input_tensor(None)
            return
        if input_tensor.shape[-1] != self.hidden_size:
            raise RuntimeError(f"pipeline tensor has width {input_tensor.shape[-1]}, expected "
                               f"{self.student_hidden} (student) + {self.teacher_hidden} (teacher) + "
                               f"{self.reference_hidden} (reference)")
        s, t = self.student_hidden, self.student_hidden + self.teacher_hidden
        self.student.set_input_tensor(input_tensor[..., :s])
        if self.teacher is not None:
            self.teacher.set_input_tensor(input_tensor[..., s:t].detach())
        if self.reference is not None:
            self.reference.set_input_tensor(input_tensor[..., t:].detach())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                teacher_input_ids: Optional[torch.Tensor] = None):
        """``teacher_input_ids``: the teacher's own tokens when its tokenizer differs (first stage)."""
        t_out = r_out = None
        taps = self._taps = {} if self.fused else None
        try:
            with torch.no_grad():
                if self.teacher is not None:
                    self.teacher.eval()
                    t_ids = input_ids if teacher_input_ids is None else teacher_input_ids
                    t_out = self.teacher(t_ids, position_ids, attention_mask)
                if self.reference is not None:
                    self.reference.eval()
                    r_out = self.reference(input_ids, position_ids, attention_mask)
            s_out = self.student(input_ids, position_ids, attention_mask)
        finally:
            self._taps = None
        if taps is not None:  # fused output layer (last stage): hidden states and weights, no logits
            none = (None, None)
            (h_s, w_s), (h_t, w_t), (h_r, w_r) = (taps.get(k, none) for k in ("student", "teacher", "reference"))
            return StageOutput(None, None, student_hidden=h_s, teacher_hidden=h_t, student_weight=w_s,
                               teacher_weight=w_t, reference_hidden=h_r, reference_weight=w_r)
        if self.last_stage:
            hidden, self._hidden = (self._hidden, {}) if self._hidden is not None else ({}, None)
            return StageOutput(s_out, t_out, hidden.get("student"), hidden.get("teacher"), r_out)
        return torch.cat([s_out] + [x.to(s_out.dtype) for x in (t_out, r_out) if x is not None], dim=-1)

    # -- checkpoints see the student only --------------------------------------
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        return self.module.load_state_dict(state_dict, strict=strict, **kwargs)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        return self.module.sharded_state_dict(prefix, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.teacher, self.reference):
            if frozen is not None:
                frozen.eval()  # frozen models never leave eval mode
        return self


def pipeline_tensor_shapes(stage_hidden: int) -> Callable:
    """An ``adjust_tensor_shapes_fn`` replacing the hidden size of every P2P shape."""

    def adjust(recv_shapes, send_shapes):
        fix = lambda shapes: [(s[0], s[1], stage_hidden) for s in shapes]  # noqa: E731
        return fix(recv_shapes), fix(send_shapes)

    return adjust


def check_schedule(virtual_pipeline: Optional[int]) -> None:
    """Reject interleaved pipeline schedules with a clear error."""
    if virtual_pipeline is not None:
        raise RecipeError(f"parallel.virtual_pipeline={virtual_pipeline}: interleaved pipeline schedules are not "
                          "supported with a co-located teacher; remove the key")


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` positions ``0..s-1`` for every sequence."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def _stage_of(model: torch.nn.Module) -> DistillStage:
    m = model
    while not isinstance(m, DistillStage):
        m = m.module
    return m


def forward_backward(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor], Any], tuple],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run one step's microbatches through megatron's (non-interleaved) schedule.

    Args:
        model: the DDP-wrapped :class:`DistillStage` (or a bare one).
        batches: this rank's microbatches (every pipeline stage reads the same
            ones; only the first uses tokens and only the last uses labels).
        loss_fn: ``loss_fn(batch, StageOutput) -> (loss_sum, count, report)``;
            called on the last stage only.
        num_microbatches, seq_length, micro_batch_size: the step's shape.
        forward_only: no backward (evaluation).

    Returns:
        The per-microbatch reports (last pipeline stage; empty elsewhere).
    """
    stage = _stage_of(model)

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        teacher_kw = {"teacher_input_ids": batch["teacher_tokens"]} if "teacher_tokens" in batch else {}
        out = m(tokens, batch.get("position_ids", position_ids_for(tokens)), None, **teacher_kw)
        return out, partial(loss_fn, batch)

    fb = get_forward_backward_func()
    extra = {}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        extra["adjust_tensor_shapes_fn"] = pipeline_tensor_shapes(stage.hidden_size)
    return fb(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **extra,
    )
