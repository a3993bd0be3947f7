"""``distill plan`` for a teacher on its own ranks (``teacher_parallel``): both roles' checks and memory.

Design: the same arithmetic as :mod:`distill_plugins.plan` (no torch, no weights),
applied to each role on its own ranks (docs/separate_teacher.md, docs/planner.md):

* the split: student ranks ``S = N x G - teacher_parallel.ranks`` (first), teacher
  ranks after them; divisibility of each model by its own TP/PP
  (:func:`distill_plugins.engine.teacher_ranks.separate_teacher_errors` for the
  teacher, :func:`distill_plugins.plan.check_layout` for the student), and whether a
  tensor-parallel group of either role straddles two nodes;
* student ranks: the co-located estimate of the student's lines (weights,
  gradients, optimizer state, activations, loss logits with one teacher-sized
  buffer: the teacher's logits are computed there) without the teacher's weights,
  plus on its last stage the **teacher output layer** copy ``Vp h_t / TP_s x w``
  and the **teacher payload** received per step ``M s b h_t x w``;
* teacher ranks: **teacher weights** per stage (``stage_params`` under the
  teacher's TP/PP), the **forward working set** (one layer's activations of one
  microbatch, plus the stage outputs the 1F1B schedule keeps in flight,
  ``min(PP_t - stage, K) s b h_t x w``: no activation outlives its layer under
  ``no_grad``), and on the last stage the **payload buffers**: ``K s b h_t x w``
  per step, twice with ``lookahead`` (the step being received and the one being
  computed), ``K = G / (b DP_t)`` microbatches per teacher replica;
* the compute balance: dense FLOPs per GPU and token, ``2 P_t / R`` for the
  teacher's forward against ``(6 P_s + 2 V h_t) / S`` for the student's forward
  and backward plus the teacher's output layer; a ratio above 1 means the
  students wait for the teacher (the run logs ``teacher_wait_s``).

No layout search: the report names the keys to change.

Usage::

    report = plan_separate(recipe, nodes=4, gpus_per_node=8)   # recipe with teacher_parallel
    print(report.format())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from .engine.teacher_ranks import (element_bytes, logits_bytes_per_token, microbatches_per_step,
                                   payload_bytes_per_token, separate_teacher_errors)
from .errors import DistillError
from .plan import (Layout, MemoryEstimate, MemoryLine, ModelShape, PlanReport, activation_bytes_per_layer,
                   check_layout, estimate_memory, format_count, format_gib, resolve_shape, stage_params)
from .recipe.schema import Recipe, padded_vocab_size
from .shapes import count_parameters

__all__ = ["SeparatePlanReport", "plan_separate", "separate_memory", "compute_balance"]


@dataclass
class SeparatePlanReport(PlanReport):
    """A :class:`~distill_plugins.plan.PlanReport` for two roles; ``layout`` is the student's.

    Attributes:
        teacher_layout: the teacher's TP/PP/DP on ``teacher_parallel.ranks`` GPUs.
        payload_bytes, logits_bytes: bytes per token of the payload and of full logits.
        balance: teacher FLOPs per GPU / student FLOPs per GPU (> 1: the students wait).
        notes: the lines of the checks that passed.
    """

    teacher_layout: Optional[Layout] = None
    payload_bytes: int = 0
    logits_bytes: int = 0
    balance: float = 0.0
    notes: list = dataclasses.field(default_factory=list)

    def format(self) -> str:
        s, t = self.layout, self.teacher_layout
        out = [f"distill plan {self.recipe_path}: {self.nodes} node(s) x {self.gpus_per_node} GPU(s) = "
               f"{s.world + t.world} GPUs, teacher on its own ranks: student {s.world} GPU(s) {s.describe()}, "
               f"teacher {t.world} GPU(s) {t.describe()}, {self.gpu_memory_gib:g} GiB per GPU"]
        out += [f"warning: {w}" for w in self.warnings]
        out += self.model_lines()
        out.append("checks:")
        out += [f"  ERROR {e}" for e in self.errors] if self.errors else [f"  ok    {n}" for n in self.notes]
        out.append(f"payload per token: teacher hidden state {self.payload_bytes} B, against {self.logits_bytes} B "
                   f"for full logits ({self.logits_bytes / max(1, self.payload_bytes):.1f}x less)")
        if self.balance:
            verdict = ("the students will wait for the teacher (teacher_wait_s): give the teacher more ranks"
                       if self.balance > 1.1 else
                       "the teacher will idle: give the student more ranks" if self.balance < 0.9 else "balanced")
            out.append(f"compute balance: teacher / student FLOPs per GPU = {self.balance:.2f}: {verdict}")
        out += self.memory_lines("docs/planner.md, docs/separate_teacher.md",
                                 "raise teacher_parallel.tensor/pipeline, parallel.tensor/pipeline, or lower "
                                 "training.micro_batch_size")
        if self.ok:
            out.append("command:")
            out.append("  " + self.command())
        else:
            out.append("no automatic layout search with teacher_parallel: change the keys named above")
        return "\n".join(out)


def compute_balance(student: ModelShape, teacher: ModelShape, *, students: int, teachers: int) -> float:
    """Teacher FLOPs per GPU over student FLOPs per GPU, per token (dense parameter counts).

    Teacher: forward ``2 P_t`` on ``teachers`` GPUs; student: forward + backward ``6 P_s``
    plus the teacher's output layer ``2 V h_t`` on ``students`` GPUs.
    """
    p_t = count_parameters(teacher, teacher.arch)
    p_s = count_parameters(student, student.arch)
    return (2 * p_t / teachers) / ((6 * p_s + 2 * teacher.vocab_size * teacher.hidden_size) / students)


def separate_memory(recipe: Recipe, student: ModelShape, teacher: ModelShape, student_layout: Layout,
                    teacher_layout: Layout, *, flash_attention: bool = True) -> MemoryEstimate:
    """Per-GPU bytes of each role's first and last stage (module docstring)."""
    tpar = recipe.teacher_parallel
    w = element_bytes(recipe.training.precision)
    s, b = recipe.data.seq_length, recipe.training.micro_batch_size
    d = recipe.parallel.make_vocab_size_divisible_by
    payload = s * b * teacher.hidden_size * w  # one microbatch's payload
    tp_s, pp_s = student_layout.tensor, student_layout.pipeline
    tp_t, pp_t = teacher_layout.tensor, teacher_layout.pipeline
    per_replica = (recipe.training.global_batch_size // b) // teacher_layout.data
    m_s = microbatches_per_step(recipe, student_layout.data)

    co = estimate_memory(recipe, student, teacher, student_layout, flash_attention=flash_attention)
    s_ids = (0,) if pp_s == 1 else (0, pp_s - 1)
    t_ids = (0,) if pp_t == 1 else (0, pp_t - 1)
    s_names = ("student",) if pp_s == 1 else ("student first", "student last")
    t_names = ("teacher",) if pp_t == 1 else ("teacher first", "teacher last")
    zeros_t = (0,) * len(t_ids)
    zeros_s = (0,) * len(s_ids)

    lines = [MemoryLine(line.name, tuple(line.bytes) + zeros_t, line.formula)
             for line in co.lines if line.name != "teacher weights"]
    vs = padded_vocab_size(teacher.vocab_size, d, tp_s)
    copy = vs // tp_s * teacher.hidden_size * w
    lines.append(MemoryLine("teacher out layer", tuple(copy if st == pp_s - 1 else 0 for st in s_ids) + zeros_t,
                            f"frozen copy [Vp={vs} / TP_s={tp_s}, h_t={teacher.hidden_size}] x {w} B "
                            "(student last stage)"))
    lines.append(MemoryLine("payload in", tuple(m_s * payload if st == pp_s - 1 else 0 for st in s_ids) + zeros_t,
                            f"{m_s} microbatch(es) x [s={s}, b={b}, h_t={teacher.hidden_size}] x {w} B received "
                            "per step (student last stage)"))
    vt = padded_vocab_size(teacher.vocab_size, d, tp_t)
    p_t = tuple(stage_params(teacher, vt, tp_t, pp_t, st) for st in t_ids)
    lines.append(MemoryLine("teacher weights", zeros_s + tuple(p * w for p in p_t),
                            f"{format_count(p_t)} params x {w} B, frozen, TP_t={tp_t} PP_t={pp_t}"))
    layer = activation_bytes_per_layer(seq=s, micro_batch=b, hidden=teacher.hidden_size,
                                       heads=teacher.num_attention_heads, tensor=tp_t, sequence_parallel=False,
                                       flash_attention=flash_attention, element_bytes=w)
    inflight = tuple(min(pp_t - st, max(1, per_replica)) for st in t_ids)
    lines.append(MemoryLine("teacher forward", zeros_s + tuple(layer + n * payload for n in inflight),
                            f"one layer's activations {format_gib(layer)} GiB + {'/'.join(map(str, inflight))} stage "
                            "output(s) in flight (no_grad)"))
    copies = 2 if tpar.lookahead else 1
    lines.append(MemoryLine("payload out", zeros_s + tuple(copies * per_replica * payload if st == pp_t - 1 else 0
                                                           for st in t_ids),
                            f"{copies} step(s) x {per_replica} microbatch(es) per replica x [s, b, h_t] x {w} B "
                            "(teacher last stage" + (", lookahead)" if tpar.lookahead else ")")))
    return MemoryEstimate(stages=s_names + t_names, lines=tuple(lines))


def plan_separate(recipe: Recipe, *, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0,
                  recipe_path: str = "RECIPE", overrides: Sequence[str] = (), flash_attention: bool = True,
                  warnings: Optional[list[str]] = None) -> SeparatePlanReport:
    """Check a ``teacher_parallel`` recipe on ``nodes`` x ``gpus_per_node`` GPUs and estimate each role's memory.

    Same arguments as :func:`distill_plugins.plan.plan`.
    """
    tpar = recipe.teacher_parallel
    if tpar is None:
        raise DistillError("plan_separate needs a recipe with teacher_parallel; use distill_plugins.plan.plan")
    if nodes < 1 or gpus_per_node < 1:
        raise DistillError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if gpu_memory_gb <= 0:
        raise DistillError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    warnings = list(warnings or [])
    world = nodes * gpus_per_node
    student = resolve_shape("student", recipe.student, warnings)
    teacher = resolve_shape("teacher", recipe.teacher, warnings)
    errors = separate_teacher_errors(recipe, world=world, teacher=teacher)
    par = recipe.parallel
    students = max(0, world - tpar.ranks)
    s_layout = Layout(tensor=par.tensor, pipeline=par.pipeline, world=students,
                      distributed_optimizer=par.distributed_optimizer, sequence_parallel=par.sequence_parallel)
    t_layout = Layout(tensor=tpar.tensor, pipeline=tpar.pipeline, world=tpar.ranks)
    split_ok = students > 0 and not students % (par.tensor * par.pipeline)
    if split_ok:
        errors += [e for e in check_layout(recipe, [student], s_layout) if e not in errors]
    if recipe.data.seq_length > student.max_position_embeddings:
        warnings.append(f"data.seq_length={recipe.data.seq_length} exceeds student "
                        f"max_position_embeddings={student.max_position_embeddings}")
    for key, tp, first in (("parallel.tensor", par.tensor, 0), ("teacher_parallel.tensor", tpar.tensor, students)):
        if tp > gpus_per_node or (first % gpus_per_node) % tp:
            warnings.append(f"{key}={tp}: a tensor-parallel group spans two nodes ({gpus_per_node} GPUs per node; "
                            f"this role starts at rank {first}): tensor parallelism across nodes is slow")
    memory = separate_memory(recipe, student, teacher, s_layout, t_layout, flash_attention=flash_attention) \
        if split_ok and not errors else None
    d = par.make_vocab_size_divisible_by
    mbs, gbs = recipe.training.micro_batch_size, recipe.training.global_batch_size
    notes = []
    if split_ok:
        notes = [
            f"world {world} = student {students} (ranks 0..{students - 1}) + teacher {tpar.ranks} "
            f"(ranks {students}..{world - 1}, teacher_parallel.ranks)",
            f"student heads/query groups {student.num_attention_heads}/{student.num_query_groups} divisible by "
            f"parallel.tensor={par.tensor}; layers {student.num_layers} by parallel.pipeline={par.pipeline}",
            f"teacher heads/query groups {teacher.num_attention_heads}/{teacher.num_query_groups} divisible by "
            f"teacher_parallel.tensor={tpar.tensor}; layers {teacher.num_layers} by "
            f"teacher_parallel.pipeline={tpar.pipeline}",
            f"global batch {gbs} = micro batch {mbs} x student DP={s_layout.data} x "
            f"{max(1, gbs // (mbs * s_layout.data))} microbatch(es); each of the teacher's {t_layout.data} "
            f"replica(s) computes {gbs // mbs // t_layout.data} microbatch(es) per step",
        ]
    return SeparatePlanReport(
        recipe_path=recipe_path, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gb,
        layout=s_layout, shapes=[student, teacher], errors=errors, warnings=warnings, memory=memory,
        padded_vocab={"student": padded_vocab_size(student.vocab_size, d, par.tensor),
                      "teacher": padded_vocab_size(teacher.vocab_size, d, tpar.tensor)},
        microbatches=max(1, gbs // (mbs * max(1, s_layout.data))), micro_batch=mbs, global_batch=gbs,
        vocab_multiple=d, overrides=list(overrides), teacher_layout=t_layout,
        payload_bytes=payload_bytes_per_token(teacher.hidden_size, recipe.training.precision),
        logits_bytes=logits_bytes_per_token(teacher.vocab_size, recipe.training.precision),
        balance=compute_balance(student, teacher, students=students, teachers=tpar.ranks) if students else 0.0,
        notes=notes)
