"""A teacher on ranks of its own: the rank split, the routing table and the layout checks (torch-free).

Design
------
With ``teacher_parallel: {ranks: R, tensor: Tt, pipeline: Pt}`` the job's ``W``
processes split in two roles (docs/separate_teacher.md):

* **student ranks** ``0 .. S-1`` (``S = W - R``) train the student with
  ``parallel.tensor`` x ``parallel.pipeline`` x DP_s (DP_s = S / (TP_s PP_s));
* **teacher ranks** ``S .. W-1`` run the teacher forward-only with
  ``Tt`` x ``Pt`` x DP_t (DP_t = R / (Tt Pt)).

The students come first so that global rank 0, which logs, writes
``metrics.jsonl``, the run record, the checkpoint metadata and the requeue
marker, is a student rank: every rank-0 duty of the co-located engine stays where
it was. Inside a role, ranks follow megatron's default order ``tp-cp-ep-dp-pp``
(cp = ep = 1), offset by the role's first rank::

    rank = offset + tp + TP * (dp + DP * pp)

which is the enumeration megatron's ``HyperCommGrid`` / ``RankGenerator`` give
with ``rank_offset=offset`` (tests/test_separate_teacher.py checks it).

**Sample routing.** Both roles read the same global batch: the student's DP rank
``d`` reads its usual microbatches ``m = 0 .. M-1`` (M = G / (b DP_s)); the teacher
reads *those same microbatches*, built with the student's ``dp_rank``/``dp_size``,
so the sample ids agree whatever the two DP sizes are. A job (one training step,
or one evaluation) has ``DP_s x M`` student microbatches, numbered
``k = m * DP_s + d``; teacher replica ``e`` computes those with ``k % DP_t == e``,
in increasing ``k``. Microbatch ``k``'s payload goes from the teacher's last stage,
TP rank ``i % Tt`` of replica ``e``, to every last-stage rank of student replica
``d`` (TP rank ``i``, ``i = 0 .. TP_s-1``): each student TP rank needs the whole
hidden state, because it computes its own vocabulary shard of the teacher's logits.
Between two ranks the messages of a job go in increasing ``k`` (:func:`routing_table`).

**Payload.** The teacher's final hidden states after its final norm,
``[s, b, h_t]`` in the training precision, plus the ``b`` sample ids (int64, a check
that both sides read the same samples): ``h_t x w`` bytes per token
(w = 2 for bf16/fp16, 4 for fp32) against ``V x w`` for the logits
(:func:`payload_bytes_per_token`). The student's last stage holds a frozen copy of
the teacher's output layer, vocab-parallel over the student's TP group, shipped
once at start-up by row ranges (:func:`weight_routes`).

Usage::

    layout = SeparateLayout.from_recipe(recipe, world=4)
    routes = routing_table(layout, microbatches=2)
    errors = separate_teacher_errors(recipe, world=4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill_plugins.errors import RecipeError
from distill_plugins.plan import resolve_shape
from distill_plugins.recipe.schema import Recipe, padded_vocab_size
from distill_plugins.shapes import ffn_hidden_size

__all__ = ["STUDENT", "TEACHER", "RoleLayout", "SeparateLayout", "Route", "routing_table", "teacher_items",
           "WeightRoute", "weight_routes", "header_source", "header_destinations", "PayloadHeader", "check_payload_header", "payload_bytes_per_token",
           "logits_bytes_per_token", "element_bytes", "separate_teacher_errors", "microbatches_per_step"]

STUDENT, TEACHER = "student", "teacher"
#: bytes per element of the training precision
_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: dtype codes of the payload header
DTYPE_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}


def element_bytes(precision: str) -> int:
    """Bytes per element of ``training.precision``."""
    return _ELEMENT_BYTES[precision]


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleLayout:
    """One role's grid: ``tensor x data x pipeline`` ranks from global rank ``offset`` on.

    Attributes:
        role: ``student`` or ``teacher``.
        tensor, pipeline, data: TP, PP and DP sizes.
        offset: global rank of the role's first process.
    """

    role: str
    tensor: int
    pipeline: int
    data: int
    offset: int

    @property
    def size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def ranks(self) -> range:
        return range(self.offset, self.offset + self.size)

    def rank(self, *, tp: int, dp: int, pp: int) -> int:
        """Global rank of coordinates ``(tp, dp, pp)`` (megatron's ``tp-cp-ep-dp-pp`` order)."""
        if not (0 <= tp < self.tensor and 0 <= dp < self.data and 0 <= pp < self.pipeline):
            raise ValueError(f"{self.role} coordinates tp={tp} dp={dp} pp={pp} outside "
                             f"TP={self.tensor} DP={self.data} PP={self.pipeline}")
        return self.offset + tp + self.tensor * (dp + self.data * pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp, dp, pp)`` of a global rank of this role."""
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not a {self.role} rank ({self.ranks.start}..{self.ranks.stop - 1})")
        local = rank - self.offset
        tp, rest = local % self.tensor, local // self.tensor
        return tp, rest % self.data, rest // self.data

    def last_stage_ranks(self) -> list[int]:
        """Every rank of the last pipeline stage, by (dp, tp)."""
        return [self.rank(tp=t, dp=d, pp=self.pipeline - 1) for d in range(self.data) for t in range(self.tensor)]

    def describe(self) -> str:
        return f"{self.size} ranks {self.offset}..{self.offset + self.size - 1}: " \
               f"TP={self.tensor} PP={self.pipeline} DP={self.data}"


@dataclass(frozen=True)
class SeparateLayout:
    """The whole job: student ranks first, then teacher ranks (module docstring)."""

    world: int
    student: RoleLayout
    teacher: RoleLayout

    @classmethod
    def from_recipe(cls, recipe: Recipe, world: int) -> "SeparateLayout":
        """The split of ``world`` processes for ``recipe`` (which has ``teacher_parallel``).

        Raises:
            RecipeError: the ranks do not add up or do not divide (naming the keys).
        """
        tpar = recipe.teacher_parallel
        if tpar is None:
            raise RecipeError("the recipe has no teacher_parallel section: the teacher is co-located")
        errors = _world_errors(recipe, world)
        if errors:
            raise RecipeError(errors)
        par = recipe.parallel
        students = world - tpar.ranks
        student = RoleLayout(STUDENT, par.tensor, par.pipeline, students // (par.tensor * par.pipeline), 0)
        teacher = RoleLayout(TEACHER, tpar.tensor, tpar.pipeline, tpar.ranks // (tpar.tensor * tpar.pipeline),
                             students)
        return cls(world=world, student=student, teacher=teacher)

    def role_of(self, rank: int) -> RoleLayout:
        """The :class:`RoleLayout` that global ``rank`` belongs to."""
        if rank in self.student.ranks:
            return self.student
        if rank in self.teacher.ranks:
            return self.teacher
        raise ValueError(f"rank {rank} is outside the world of {self.world}")

    def record(self) -> dict[str, Any]:
        """The layout written into checkpoints (a resume must match it)."""
        return {"tp": self.student.tensor, "pp": self.student.pipeline, "dp": self.student.data,
                "teacher": {"ranks": self.teacher.size, "tp": self.teacher.tensor, "pp": self.teacher.pipeline,
                            "dp": self.teacher.data}}

    def describe(self) -> str:
        return f"student {self.student.describe()}; teacher {self.teacher.describe()}"


def _world_errors(recipe: Recipe, world: int) -> list[str]:
    tpar, par = recipe.teacher_parallel, recipe.parallel
    students = world - tpar.ranks
    mp = par.tensor * par.pipeline
    if students <= 0:
        return [f"teacher_parallel.ranks={tpar.ranks} leaves no student rank in a world of {world} processes: "
                f"launch more than {tpar.ranks} processes or lower teacher_parallel.ranks"]
    if students % mp:
        return [f"the student gets world size {world} - teacher_parallel.ranks={tpar.ranks} = {students} ranks, "
                f"which is not a multiple of parallel.tensor x parallel.pipeline = {par.tensor} x {par.pipeline}; "
                f"launch {tpar.ranks} + a multiple of {mp} processes"]
    return []


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One payload message of a job.

    Attributes:
        index: ``k = micro * DP_s + student_dp``, the microbatch's number in the job.
        micro: the microbatch's index on its student DP rank.
        student_dp: the student DP replica reading it.
        teacher_dp: the teacher replica computing it (``k % DP_t``).
        student_tp: TP rank of the receiving student rank.
        src: global rank of the sender (teacher last stage, TP rank ``student_tp % Tt``).
        dst: global rank of the receiver (student last stage).
    """

    index: int
    micro: int
    student_dp: int
    teacher_dp: int
    student_tp: int
    src: int
    dst: int


def routing_table(layout: SeparateLayout, microbatches: int) -> list[Route]:
    """Every payload message of a job of ``microbatches`` microbatches per student DP rank, in send order."""
    s, t = layout.student, layout.teacher
    routes = []
    for micro in range(microbatches):
        for d in range(s.data):
            k = micro * s.data + d
            e = k % t.data
            for i in range(s.tensor):
                routes.append(Route(index=k, micro=micro, student_dp=d, teacher_dp=e, student_tp=i,
                                    src=t.rank(tp=i % t.tensor, dp=e, pp=t.pipeline - 1),
                                    dst=s.rank(tp=i, dp=d, pp=s.pipeline - 1)))
    return routes


def teacher_items(layout: SeparateLayout, teacher_dp: int, microbatches: int) -> list[tuple[int, int]]:
    """``(micro, student_dp)`` of the microbatches teacher replica ``teacher_dp`` computes in a job, in order."""
    s, t = layout.student, layout.teacher
    return [divmod(k, s.data) for k in range(microbatches * s.data) if k % t.data == teacher_dp]


@dataclass(frozen=True)
class WeightRoute:
    """Rows ``[start, stop)`` of the teacher's output layer, sent once from ``src`` to ``dst``.

    ``src`` is a last-stage rank of teacher replica 0 (TP rank ``teacher_tp``), ``dst``
    a last-stage student rank (TP rank ``student_tp``); rows are global vocabulary ids.
    """

    src: int
    dst: int
    teacher_tp: int
    student_tp: int
    start: int
    stop: int


def weight_routes(layout: SeparateLayout, *, vocab_size: int, make_vocab_size_divisible_by: int) -> list[WeightRoute]:
    """How the teacher's output layer ``[V, h_t]`` reaches the student's TP shards.

    Teacher TP rank ``j`` holds padded rows ``[j Vt/Tt, (j+1) Vt/Tt)`` (``Vt`` padded for
    the teacher's TP), student TP rank ``i`` needs ``[i Vs/TP_s, (i+1) Vs/TP_s)``
    (``Vs`` padded for the student's TP, like the student's own output layer); only real
    rows (< ``vocab_size``) travel, padding rows stay zero. Every student DP replica gets
    its copy. Ordered by destination, then teacher TP rank.
    """
    s, t = layout.student, layout.teacher
    rows_t = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, t.tensor) // t.tensor
    rows_s = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, s.tensor) // s.tensor
    out = []
    for d in range(s.data):
        for i in range(s.tensor):
            lo_s, hi_s = i * rows_s, min((i + 1) * rows_s, vocab_size)
            for j in range(t.tensor):
                lo, hi = max(lo_s, j * rows_t), min(hi_s, (j + 1) * rows_t)
                if lo < hi:
                    out.append(WeightRoute(src=t.rank(tp=j, dp=0, pp=t.pipeline - 1),
                                           dst=s.rank(tp=i, dp=d, pp=s.pipeline - 1),
                                           teacher_tp=j, student_tp=i, start=lo, stop=hi))
    return out


def header_source(layout: SeparateLayout, dst: int) -> int:
    """The teacher rank that sends the payload header to student last-stage rank ``dst``.

    TP rank ``i mod Tt`` of teacher replica 0's last stage, for the student's TP rank ``i`` (every
    receiver gets one header, even a TP shard that holds only vocabulary padding).
    """
    s, t = layout.student, layout.teacher
    return t.rank(tp=s.coords(dst)[0] % t.tensor, dp=0, pp=t.pipeline - 1)


def header_destinations(layout: SeparateLayout, src: int) -> list[int]:
    """The student ranks to which teacher rank ``src`` sends the payload header (:func:`header_source`)."""
    return [dst for dst in layout.student.last_stage_ranks() if header_source(layout, dst) == src]


# ---------------------------------------------------------------------------
# Payload header
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadHeader:
    """What one side believes a payload is; the teacher sends its own, the student compares.

    Each field names the recipe key it comes from, so a mismatch reads as a key.
    """

    seq_length: int
    micro_batch_size: int
    hidden_size: int
    precision: str
    vocab_size: int

    KEYS = (("seq_length", "data.seq_length"), ("micro_batch_size", "training.micro_batch_size"),
            ("hidden_size", "teacher.hidden_size"), ("precision", "training.precision"),
            ("vocab_size", "teacher.vocab_size"))

    def encode(self) -> list[int]:
        return [self.seq_length, self.micro_batch_size, self.hidden_size, DTYPE_CODES[self.precision],
                self.vocab_size]

    @classmethod
    def decode(cls, values) -> "PayloadHeader":
        names = {v: k for k, v in DTYPE_CODES.items()}
        s, b, h, code, v = (int(x) for x in values)
        return cls(seq_length=s, micro_batch_size=b, hidden_size=h, precision=names.get(code, f"code {code}"),
                   vocab_size=v)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``[s, b, h_t]``."""
        return (self.seq_length, self.micro_batch_size, self.hidden_size)


def check_payload_header(expected: PayloadHeader, received: PayloadHeader) -> list[str]:
    """Every difference between the student's expectation and the teacher's header, naming the key."""
    errors = []
    for field, key in PayloadHeader.KEYS:
        want, got = getattr(expected, field), getattr(received, field)
        if want != got:
            errors.append(f"teacher payload mismatch: the teacher ranks send {key}={got!r}, the student ranks "
                          f"expect {key}={want!r} (both sides must resolve the same recipe and model configs)")
    return errors


def payload_bytes_per_token(hidden_size: int, precision: str) -> int:
    """Bytes per token of the payload: the teacher's hidden state ``h_t x w`` (sample ids are per sequence)."""
    return hidden_size * element_bytes(precision)


def logits_bytes_per_token(vocab_size: int, precision: str) -> int:
    """Bytes per token of the full teacher logits ``V x w``, what shipping logits would cost."""
    return vocab_size * element_bytes(precision)


def microbatches_per_step(recipe: Recipe, student_dp: int) -> int:
    """Microbatches per student DP rank per step: ``G / (b DP_s)``."""
    t = recipe.training
    return t.global_batch_size // (t.micro_batch_size * student_dp)


# ---------------------------------------------------------------------------
# Checks (distill check, distill plan, and the engine before it starts)
# ---------------------------------------------------------------------------


def separate_teacher_errors(recipe: Recipe, *, world: Optional[int] = None, teacher: Any = None) -> list[str]:
    """Every problem of ``recipe``'s ``teacher_parallel`` layout, each naming its keys (empty when co-located).

    Args:
        recipe: the recipe.
        world: total processes of the job, when known (``distill plan``, the engine); the
            split is then checked too.
        teacher: the teacher's shape (an object with ``num_attention_heads``,
            ``num_query_groups``, ``ffn_hidden_size``, ``num_layers``...); default: resolved
            from ``teacher.hf``'s config.json when the directory exists, else the recipe's keys.

    Returns:
        Error strings (the notes of resolving ``teacher.hf``, e.g. an absent directory, are left to
        the caller, which resolves the models itself).
    """
    tpar = recipe.teacher_parallel
    if tpar is None:
        return []
    errors: list = []
    if teacher is None:
        teacher = recipe.teacher
        if teacher.hf:  # config.json when the directory exists, else the recipe's keys
            try:
                teacher = resolve_shape("teacher", recipe.teacher, [])  # its notes are the caller's business
            except RecipeError as exc:
                return list(exc.errors)
    if recipe.teacher.megatron or recipe.teacher.checkpoint:
        teacher = None  # refused below; the recipe's shape keys do not describe a checkpoint
    if teacher is not None:
        tp, pp = tpar.tensor, tpar.pipeline
        groups = teacher.num_query_groups or teacher.num_attention_heads
        ffn = teacher.ffn_hidden_size or ffn_hidden_size(teacher)
        for key, value, div, dkey in (("num_attention_heads", teacher.num_attention_heads, tp, "tensor"),
                                      ("num_query_groups", groups, tp, "tensor"),
                                      ("ffn_hidden_size", ffn, tp, "tensor"),
                                      ("num_layers", teacher.num_layers, pp, "pipeline")):
            if value % div:
                errors.append(f"teacher.{key}={value} is not divisible by teacher_parallel.{dkey}={div}")
        if recipe.data.seq_length > teacher.max_position_embeddings:
            errors.append(f"data.seq_length={recipe.data.seq_length} exceeds teacher.max_position_embeddings="
                          f"{teacher.max_position_embeddings}")
    t = recipe.training
    teacher_dp = tpar.ranks // (tpar.tensor * tpar.pipeline)
    per_step = t.global_batch_size // t.micro_batch_size
    if per_step % teacher_dp:
        errors.append(f"training.global_batch_size / training.micro_batch_size = {per_step} microbatches per step "
                      f"do not split evenly over the teacher's {teacher_dp} data-parallel replicas "
                      f"(teacher_parallel.ranks / (tensor x pipeline)); change one of them")
    if recipe.loss.kd_weight <= 0:
        errors.append("teacher_parallel needs loss.kd_weight > 0: a run without distillation builds no teacher; "
                      "remove teacher_parallel")
    if recipe.data.teacher_tokenizer:
        errors.append("teacher_parallel supports one tokenizer: remove data.teacher_tokenizer (cross-tokenizer "
                      "aligners need the co-located teacher)")
    if recipe.aligner.name not in ("auto", "identity"):
        errors.append(f"aligner={recipe.aligner.name!r} is not supported with teacher_parallel (the payload is the "
                      "teacher's hidden state on the student's tokens); use aligner: auto or identity")
    if recipe.reference is not None:
        errors.append("reference: a frozen reference model (AdaSPEC) is not supported with teacher_parallel; "
                      "remove teacher_parallel or the reference section")
    for role in ("student", "teacher"):
        spec = getattr(recipe, role)
        for key in ("megatron", "checkpoint"):
            if getattr(spec, key):
                errors.append(f"{role}.{key}: weights from a megatron checkpoint load with collectives over the "
                              "whole job, which the two roles cannot share yet; with teacher_parallel use "
                              f"{role}.hf (or convert: distill export)")
    if world is not None:
        errors.extend(_world_errors(recipe, world))
        if not errors:
            par = recipe.parallel
            student_dp = (world - tpar.ranks) // (par.tensor * par.pipeline)
            if t.global_batch_size % (t.micro_batch_size * student_dp):
                errors.append(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                              f"training.micro_batch_size={t.micro_batch_size} x the student's data-parallel size "
                              f"{student_dp} = {t.micro_batch_size * student_dp}")
    return errors
