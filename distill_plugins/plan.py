"""The planner behind ``distill plan``: will this recipe run on this cluster, and in how much memory?

Design: pure arithmetic on model shapes, no torch and no weights. Shapes come from
the model's source when its directory exists on this machine, read by
:func:`distill_plugins.models.resolve.resolve_model` (``hf:`` config.json through the
one HF-config parser that ``distill check`` and ``distill run`` use, so the planner
refuses exactly what they refuse; ``megatron:`` / ``checkpoint:``
``distill_model.json``), otherwise from the shape keys in the recipe with a warning
(so cluster recipes can be planned on a laptop). Loading a recipe for planning is
the CLI's job (:mod:`distill_plugins.cli.plan`). Every formula is written out in
docs/planner.md; the ones used here are:

* parameters per GPU: tensor-parallel matrices divided by TP, norms (and
  row-parallel biases) replicated; layers split evenly over PP stages; the
  embedding on the first stage, final norm and output layer on the last (with
  tied embeddings and PP > 1 the last stage keeps its own copy, as megatron does);
* vocabulary padding: ``Vp = ceil(V / (d * TP)) * d * TP``, d = make_vocab_size_divisible_by;
* student weights ``P * w`` (w = 2 bytes for bf16/fp16, 4 for fp32); gradients
  ``4 P`` (megatron DDP keeps fp32 main grads); Adam state ``(8 + m) P`` with
  m = 4 fp32 master bytes unless the model is already fp32, divided by DP with the
  distributed optimizer;
* teacher (and reference) weights ``P_t * w``: frozen, no gradients, no optimizer (none with ``loss.kd_weight: 0``);
* activations per student layer (Korthikanti et al. 2022, 16-bit activations):
  ``s b h (10 + 24/t + 5 a s / (h t))`` bytes without sequence parallelism,
  ``s b h (34 + 5 a s / h) / t`` with it; the ``5 a s / h`` attention-score term is
  dropped for fused/flash attention (the default); x2 for fp32; times the
  microbatches a stage holds under 1F1B: ``min(PP - stage, microbatches)``;
* loss logits on the last stage: fp32 ``[s b, Vp / TP]`` for the student and the
  teacher plus a workspace of two student-sized fp32 buffers (the objective's
  probabilities); the DSKD aligner adds one student- and one teacher-sized buffer.
  With the fused output layer (``loss.fused_output_layer`` true, or auto with one
  tokenizer and a co-located teacher) instead: five fp32 ``[R, Vp / TP]`` chunk
  buffers (``R = max(256, 2**25 / (Vp / TP))`` rows, at most ``s b``), the fp32
  ``dL/dW`` accumulator ``[Vp / TP, h_s]`` and the rows of hidden states
  ``s b (2 h_s + h_t [+ h_r]) w`` (the student's copy and gradient, the teacher's
  and the reference's copies).

It is an estimate: CUDA context, NCCL buffers, allocator fragmentation and
transient all-gathers are not counted; keep a margin of a few GiB.

Usage::

    report = plan(recipe, nodes=2, gpus_per_node=8)   # recipe: cli.plan.load_for_plan(path)
    print(report.format())
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .errors import DistillError
from .models.resolve import resolve_or_fallback
from .recipe.schema import ModelSpec, Recipe, padded_vocab_size
from .shapes import TransformerShape, count_parameters, embedding_params, final_norm_params, layer_params, \
    output_params, shape_keys

GIB = 1 << 30
#: bytes per parameter or activation element by training precision
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: the tensor-parallel sizes the layout search tries
TP_CHOICES = (1, 2, 4, 8)
#: fp32 student-sized [s*b, Vp/TP] buffers the loss keeps besides the two logits tensors
LOSS_WORKSPACE_BUFFERS = 2
#: fused output layer (distill_plugins.objectives.fused): logits per chunk at the default chunk size, the
#: smallest default chunk (rows) and the fp32 [rows, Vp/TP] buffers one chunk holds at a time
FUSED_CHUNK_LOGITS, FUSED_MIN_CHUNK_ROWS, FUSED_CHUNK_BUFFERS = 1 << 25, 256, 5
SBATCH_SCRIPT = "launch/slurm/distill.sbatch"


# ---------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelShape(TransformerShape):
    """What the planner needs to know about one model.

    The shape keys are those of :class:`~distill_plugins.shapes.TransformerShape`.

    Attributes:
        role: recipe section (``student``, ``teacher``, ``reference``).
        arch: ``llama`` or ``gpt2``.
        source: where the shape was read: ``recipe``, ``<dir>/config.json`` or ``<dir>/distill_model.json``.
    """

    role: str
    arch: str
    source: str = "recipe"


def resolve_shape(role: str, spec: ModelSpec, warnings: list[str]) -> ModelShape:
    """The shape of ``spec``: from its source's config file when the directory exists, else the recipe's keys.

    The rule, its warnings and its errors (:class:`~distill_plugins.errors.RecipeError`)
    are :func:`distill_plugins.models.resolve.resolve_or_fallback`'s, shared with ``distill check``.
    """
    resolved, source = resolve_or_fallback(role, spec, warnings)
    return ModelShape(role=role, arch=resolved.arch, **shape_keys(resolved), source=source)


# ---------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------


def stage_params(shape: ModelShape, vocab: int, tensor: int, pipeline: int, stage: int) -> int:
    """Parameters one GPU of pipeline ``stage`` holds."""
    layers = -(-shape.num_layers // pipeline)
    params = layer_params(shape, shape.arch) * layers
    if stage == 0:
        params = params + embedding_params(shape, shape.arch, vocab)
    if stage == pipeline - 1:
        params = params + final_norm_params(shape, shape.arch)
        if not shape.tie_embeddings or pipeline > 1:
            params = params + output_params(shape, vocab)
    return params.per_gpu(tensor)


# ---------------------------------------------------------------------------
# Layout and checks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A parallel layout on ``world`` GPUs."""

    tensor: int
    pipeline: int
    world: int
    distributed_optimizer: bool = False
    sequence_parallel: bool = False

    @property
    def data(self) -> int:
        return max(1, self.world // (self.tensor * self.pipeline))

    def describe(self) -> str:
        extras = [x for x, on in (("distributed optimizer", self.distributed_optimizer),
                                  ("sequence parallel", self.sequence_parallel)) if on]
        dp = self.data if not self.world % (self.tensor * self.pipeline) else "n/a"
        return f"TP={self.tensor} PP={self.pipeline} DP={dp}" + (f" ({', '.join(extras)})" if extras else "")

    def overrides(self) -> list[str]:
        """``key=value`` overrides that select this layout."""
        return [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}"]


def check_layout(recipe: Recipe, shapes: Sequence[ModelShape], layout: Layout) -> list[str]:
    """Every divisibility problem of ``layout`` for ``recipe``, each naming the numbers."""
    errors = []
    tp, pp, world = layout.tensor, layout.pipeline, layout.world
    if world % (tp * pp):
        errors.append(f"{world} GPUs are not divisible by parallel.tensor={tp} x parallel.pipeline={pp} = {tp * pp}")
    for s in shapes:
        if s.num_attention_heads % tp:
            errors.append(f"{s.role}.num_attention_heads={s.num_attention_heads} is not divisible by "
                          f"parallel.tensor={tp}")
        if s.num_query_groups % tp:
            errors.append(f"{s.role}.num_query_groups={s.num_query_groups} is not divisible by parallel.tensor={tp}")
        if s.ffn_hidden_size % tp:
            errors.append(f"{s.role}.ffn_hidden_size={s.ffn_hidden_size} is not divisible by parallel.tensor={tp}")
        if s.num_layers % pp:
            errors.append(f"{s.role}.num_layers={s.num_layers} is not divisible by parallel.pipeline={pp}")
    if not world % (tp * pp):
        mbs, gbs = recipe.training.micro_batch_size, recipe.training.global_batch_size
        if gbs % (mbs * layout.data):
            errors.append(f"training.global_batch_size={gbs} is not divisible by training.micro_batch_size={mbs} "
                          f"x data-parallel size {layout.data} = {mbs * layout.data}")
    if layout.sequence_parallel:
        if tp == 1:
            errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
        elif recipe.data.seq_length % tp:
            errors.append(f"data.seq_length={recipe.data.seq_length} is not divisible by parallel.tensor={tp} "
                          "(sequence parallelism)")
    return errors


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def activation_bytes_per_layer(*, seq: int, micro_batch: int, hidden: int, heads: int, tensor: int,
                               sequence_parallel: bool, flash_attention: bool, element_bytes: int = 2) -> int:
    """Stored activations of one layer for one microbatch (Korthikanti et al. 2022, Eqs. 2-4).

    ``s b h (10 + 24/t + 5 a s/(h t))`` without sequence parallelism, ``s b h (34 + 5 a s/h) / t``
    with it, for 16-bit activations; the ``5 a s/h`` score term is 0 with fused/flash attention.
    ``element_bytes=4`` (fp32 training) doubles it.
    """
    sbh = seq * micro_batch * hidden
    scores = 0 if flash_attention else 5 * heads * seq * micro_batch * seq  # 5 a s^2 b
    if sequence_parallel:
        value = (34 * sbh + scores) / tensor
    else:
        value = 10 * sbh + (24 * sbh + scores) / tensor
    return int(round(value * element_bytes / 2))


@dataclass(frozen=True)
class MemoryLine:
    """One line of the estimate: bytes per GPU on each reported stage, and how it was computed."""

    name: str
    bytes: tuple[int, ...]
    formula: str


@dataclass(frozen=True)
class MemoryEstimate:
    stages: tuple[str, ...]
    lines: tuple[MemoryLine, ...]

    @property
    def totals(self) -> tuple[int, ...]:
        return tuple(sum(line.bytes[i] for line in self.lines) for i in range(len(self.stages)))

    @property
    def peak(self) -> int:
        return max(self.totals)

    def line(self, name: str) -> MemoryLine:
        return next(line for line in self.lines if line.name == name)


def estimate_memory(recipe: Recipe, student: ModelShape, teacher: ModelShape, layout: Layout,
                    reference: Optional[ModelShape] = None, *, flash_attention: bool = True) -> MemoryEstimate:
    """Per-GPU bytes for the first and (when PP > 1) the last pipeline stage. See the module docstring."""
    tp, pp, dp = layout.tensor, layout.pipeline, layout.data
    d = recipe.parallel.make_vocab_size_divisible_by
    precision = recipe.training.precision
    w = WEIGHT_BYTES[precision]
    master = 0 if precision == "fp32" else 4
    s, b = recipe.data.seq_length, recipe.training.micro_batch_size
    microbatches = max(1, recipe.training.global_batch_size // (b * dp))
    vs, vt = padded_vocab_size(student.vocab_size, d, tp), padded_vocab_size(teacher.vocab_size, d, tp)
    stage_ids = (0,) if pp == 1 else (0, pp - 1)
    stage_names = ("all layers",) if pp == 1 else ("first stage", "last stage")
    opt_div = dp if layout.distributed_optimizer else 1

    def per_stage(fn) -> tuple[int, ...]:
        return tuple(int(fn(st)) for st in stage_ids)

    p_s = per_stage(lambda st: stage_params(student, vs, tp, pp, st))
    p_t = per_stage(lambda st: stage_params(teacher, vt, tp, pp, st))
    lines = [
        MemoryLine("student weights", tuple(p * w for p in p_s),
                   f"{format_count(p_s)} params x {w} B ({precision})"),
        MemoryLine("gradients", tuple(p * 4 for p in p_s), f"{format_count(p_s)} params x 4 B (fp32 main grads)"),
        MemoryLine("optimizer state", tuple(p * (8 + master) // opt_div for p in p_s),
                   f"{format_count(p_s)} params x {8 + master} B (Adam: "
                   + ("fp32 master + " if master else "") + "2 fp32 moments)"
                   + (f" / DP={dp} (distributed optimizer)" if layout.distributed_optimizer else "")),
    ]
    has_teacher = recipe.loss.kd_weight > 0  # kd_weight 0: the engine builds no teacher (CE only)
    if has_teacher:
        lines.append(MemoryLine("teacher weights", tuple(p * w for p in p_t),
                                f"{format_count(p_t)} params x {w} B, frozen"))
    if reference is not None and has_teacher:
        vr = padded_vocab_size(reference.vocab_size, d, tp)
        p_r = per_stage(lambda st: stage_params(reference, vr, tp, pp, st))
        lines.append(MemoryLine("reference weights", tuple(p * w for p in p_r),
                                f"{format_count(p_r)} params x {w} B, frozen"))

    per_layer = activation_bytes_per_layer(seq=s, micro_batch=b, hidden=student.hidden_size,
                                           heads=student.num_attention_heads, tensor=tp,
                                           sequence_parallel=layout.sequence_parallel,
                                           flash_attention=flash_attention, element_bytes=w)
    layers = -(-student.num_layers // pp)
    inflight = per_stage(lambda st: min(pp - st, microbatches))
    lines.append(MemoryLine("activations", tuple(per_layer * layers * n for n in inflight),
                            f"{format_gib(per_layer)} GiB/layer x {layers} layers x {'/'.join(map(str, inflight))} "
                            f"microbatch(es) in flight"))

    tokens = s * b
    if fused_output_layer_planned(recipe):
        lines.append(_fused_loss_line(recipe, student, teacher, reference, tokens, vs // tp, w, stage_ids, pp))
        return MemoryEstimate(stages=stage_names, lines=tuple(lines))
    student_buffers = 1 + LOSS_WORKSPACE_BUFFERS
    teacher_buffers = 1 if has_teacher else 0
    if recipe.aligner.name == "dskd" and has_teacher:
        student_buffers += 1
        teacher_buffers += 1
    logits = tokens * 4 * (student_buffers * (vs // tp) + teacher_buffers * (vt // tp))
    lines.append(MemoryLine("loss logits", tuple(logits if st == pp - 1 else 0 for st in stage_ids),
                            f"[{tokens} tokens, V/TP] fp32 x ({student_buffers} student-sized (Vp={vs}) + "
                            f"{teacher_buffers} teacher-sized (Vp={vt}))"))
    return MemoryEstimate(stages=stage_names, lines=tuple(lines))


def fused_output_layer_planned(recipe: Recipe) -> bool:
    """Whether the run's last stage uses the fused output layer, as far as the recipe alone tells.

    ``loss.fused_output_layer``: ``false`` -> no; ``true`` -> yes (``distill check`` refuses parts that
    cannot); ``auto`` -> yes unless a cross-tokenizer aligner is named or the teacher runs on its own
    ranks (the engine's rule, :func:`distill_plugins.objectives.fused.decide_fused_output_layer`; the
    parts' own support is checked by ``distill check``, which the planner does not load).
    """
    setting = recipe.loss.fused_output_layer
    if setting is False:
        return False
    if setting is True or recipe.loss.kd_weight == 0:
        return True
    return recipe.aligner.name in ("identity", "auto") and recipe.teacher_parallel is None and not (
        recipe.aligner.name == "auto" and recipe.data.teacher_tokenizer
        and recipe.data.teacher_tokenizer != recipe.data.tokenizer)


def _fused_loss_line(recipe: Recipe, student: ModelShape, teacher: ModelShape, reference: Optional[ModelShape],
                     tokens: int, v_local: int, w: int, stage_ids: Sequence[int], pp: int) -> MemoryLine:
    """The fused output layer's last-stage loss memory (docs/planner.md, "loss logits")."""
    rows = min(tokens, max(FUSED_MIN_CHUNK_ROWS, FUSED_CHUNK_LOGITS // max(1, v_local)))
    chunks = FUSED_CHUNK_BUFFERS * rows * v_local * 4
    grad_w = 4 * v_local * student.hidden_size
    hidden = student.hidden_size * 2 + (teacher.hidden_size if recipe.loss.kd_weight > 0 else 0)
    if reference is not None and recipe.loss.kd_weight > 0:
        hidden += reference.hidden_size
    rows_bytes = tokens * w * hidden
    total = chunks + grad_w + rows_bytes
    return MemoryLine("loss logits", tuple(total if st == pp - 1 else 0 for st in stage_ids),
                      f"fused output layer: {FUSED_CHUNK_BUFFERS} x [{rows} rows, V/TP={v_local}] fp32 chunk buffers "
                      f"+ dL/dW [V/TP, {student.hidden_size}] fp32 + [{tokens} tokens, {hidden}] hidden rows "
                      f"x {w} B (loss.fused_output_layer: {_yaml(recipe.loss.fused_output_layer)})")


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_count(values: Iterable[int]) -> str:
    """Parameter counts as ``1.234B`` (from 10^8) or ``12.34M``, joined by ``/`` (one per stage)."""
    return "/".join(f"{v / 1e9:.3f}B" if v >= 1e8 else f"{v / 1e6:.2f}M" for v in values)


def format_gib(n: float) -> str:
    """Bytes in GiB with two decimals."""
    return f"{n / GIB:.2f}"


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass
class PlanReport:
    """Everything ``distill plan`` prints. ``ok`` is False when the layout is refused or does not fit."""

    recipe_path: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    layout: Layout
    shapes: list[ModelShape]
    errors: list[str]
    warnings: list[str]
    memory: Optional[MemoryEstimate]
    padded_vocab: dict[str, int]
    microbatches: int
    micro_batch: int = 1
    global_batch: int = 1
    vocab_multiple: int = 128
    suggestion: Optional[tuple[Layout, MemoryEstimate]] = None
    overrides: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.peak <= self.gpu_memory_gib * GIB

    @property
    def ok(self) -> bool:
        return not self.errors and self.fits

    def command(self, extra_overrides: Sequence[str] = ()) -> str:
        args = ["sbatch", f"--nodes={self.nodes}", f"--gpus-per-node={self.gpus_per_node}", SBATCH_SCRIPT,
                self.recipe_path, *self.overrides, *extra_overrides]
        return "mkdir -p logs && " + " ".join(shlex.quote(a) for a in args)

    def format(self) -> str:
        out = [f"distill plan {self.recipe_path}: {self.nodes} node(s) x {self.gpus_per_node} GPU(s) = "
               f"{self.layout.world} GPUs, {self.layout.describe()}, {self.gpu_memory_gib:g} GiB per GPU"]
        out += [f"warning: {w}" for w in self.warnings]
        out += self.model_lines()
        out.append("checks:")
        if self.errors:
            out += [f"  ERROR {e}" for e in self.errors]
        else:
            tp, pp = self.layout.tensor, self.layout.pipeline
            out.append("  ok    heads and query groups divisible by TP=" + str(tp) + ": " + ", ".join(
                f"{s.role} {s.num_attention_heads}/{s.num_query_groups}" for s in self.shapes))
            out.append("  ok    layers divisible by PP=" + str(pp) + ": " + ", ".join(
                f"{s.role} {s.num_layers}" for s in self.shapes))
            out.append(f"  ok    global batch {self.global_batch} = micro batch {self.micro_batch} x DP="
                       f"{self.layout.data} x {self.microbatches} microbatch(es) per step")
            out.append(f"  ok    vocabularies padded to a multiple of {self.vocab_multiple} x TP={tp}")
        out += self.memory_lines()
        if self.suggestion is not None:
            layout, memory = self.suggestion
            out.append(f"suggested layout: {layout.describe()}, peak {format_gib(memory.peak)} GiB:")
            out.append("  " + " ".join(layout.overrides()))
            out.append("command:")
            out.append("  " + self.command(layout.overrides()))
        elif not self.ok:
            out.append(f"no layout (TP in {{1,2,4,8}}, PP dividing the GPUs, distributed optimizer and sequence "
                       f"parallelism on or off) both divides and fits on {self.layout.world} GPUs: change the GPU "
                       "count, training.global_batch_size or training.micro_batch_size, or data.seq_length")
        else:
            out.append("command:")
            out.append("  " + self.command())
        return "\n".join(out)

    def model_lines(self) -> list[str]:
        """``models:`` and a line per model: shape, padded vocabulary, parameters, where the shape was read."""
        out = ["models:"]
        for s in self.shapes:
            vp = self.padded_vocab[s.role]
            out.append(f"  {s.role:<9} {s.arch:<5} {s.num_layers} layers, hidden {s.hidden_size}, ffn "
                       f"{s.ffn_hidden_size}, heads {s.num_attention_heads}, query groups {s.num_query_groups}, "
                       f"vocab {s.vocab_size} -> padded {vp} (+{vp - s.vocab_size}), "
                       f"{format_count([count_parameters(s, s.arch)])} params  [{s.source}]")
        return out

    def memory_lines(self, docs: str = "docs/planner.md", over_memory_fix: str = "") -> list[str]:
        """The memory table and whether its peak fits one GPU (none without an estimate).

        ``over_memory_fix`` is appended to the over-memory warning (``: <keys to change>``).
        """
        if self.memory is None:
            return []
        out = [f"memory per GPU, GiB (an estimate; {docs}):"] + memory_table(self.memory)
        peak = self.memory.peak
        if self.fits:
            out.append(f"  fits: peak {format_gib(peak)} of {self.gpu_memory_gib:g} GiB "
                       f"({100 * peak / (self.gpu_memory_gib * GIB):.0f}%; CUDA context and NCCL buffers not counted)")
        else:
            out.append(f"  WARNING: peak {format_gib(peak)} GiB exceeds the {self.gpu_memory_gib:g} GiB of one GPU"
                       + (f": {over_memory_fix}" if over_memory_fix else ""))
        return out


def memory_table(memory: MemoryEstimate) -> list[str]:
    """The estimate as rows: a column of GiB per stage, each line's formula, the totals."""
    head = "  " + f"{'':<18}" + "".join(f"{name:>13}" for name in memory.stages)
    rows = [head]
    for line in memory.lines:
        gib = "".join(f"{format_gib(v):>13}" for v in line.bytes)
        rows.append("  " + f"{line.name:<18}" + gib + f"   {line.formula}")
    rows.append("  " + f"{'total':<18}" + "".join(f"{format_gib(v):>13}" for v in memory.totals))
    return rows


def plan(recipe: Recipe, *, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0,
         recipe_path: str = "RECIPE", overrides: Sequence[str] = (), flash_attention: bool = True,
         warnings: Optional[list[str]] = None) -> PlanReport:
    """Check ``recipe``'s layout on ``nodes`` x ``gpus_per_node`` GPUs and estimate its memory.

    Args:
        recipe: the recipe (its ``parallel`` section is the layout checked).
        nodes, gpus_per_node: the allocation.
        gpu_memory_gb: memory of one GPU in GiB (2^30 bytes).
        recipe_path, overrides: echoed in the printed sbatch command.
        flash_attention: drop the attention-score activations (fused/flash attention).
        warnings: messages gathered while loading (shown first).
    """
    if nodes < 1 or gpus_per_node < 1:
        raise DistillError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if gpu_memory_gb <= 0:
        raise DistillError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    if recipe.teacher_parallel is not None:  # two layouts: distill_plugins.plan_separate (distill plan picks it)
        raise DistillError("the recipe has teacher_parallel: plan it with distill_plugins.plan_separate.plan_separate")
    warnings = list(warnings or [])
    student = resolve_shape("student", recipe.student, warnings)
    teacher = resolve_shape("teacher", recipe.teacher, warnings)
    reference = resolve_shape("reference", recipe.reference, warnings) if recipe.reference else None
    shapes = [s for s in (student, teacher, reference) if s is not None]
    for s in shapes:
        if recipe.data.seq_length > s.max_position_embeddings:
            warnings.append(f"data.seq_length={recipe.data.seq_length} exceeds {s.role} "
                            f"max_position_embeddings={s.max_position_embeddings}")
    par = recipe.parallel
    layout = Layout(tensor=par.tensor, pipeline=par.pipeline, world=nodes * gpus_per_node,
                    distributed_optimizer=par.distributed_optimizer, sequence_parallel=par.sequence_parallel)
    if layout.tensor > gpus_per_node:
        warnings.append(f"parallel.tensor={layout.tensor} spans nodes ({gpus_per_node} GPUs per node): "
                        "tensor parallelism across nodes is slow")
    errors = check_layout(recipe, shapes, layout)

    def estimate(lay: Layout) -> MemoryEstimate:
        return estimate_memory(recipe, student, teacher, lay, reference, flash_attention=flash_attention)

    memory = estimate(layout) if not layout.world % (layout.tensor * layout.pipeline) else None
    d = par.make_vocab_size_divisible_by
    report = PlanReport(
        recipe_path=recipe_path, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gb,
        layout=layout, shapes=shapes, errors=errors, warnings=warnings, memory=memory,
        padded_vocab={s.role: padded_vocab_size(s.vocab_size, d, layout.tensor) for s in shapes},
        microbatches=max(1, recipe.training.global_batch_size // (recipe.training.micro_batch_size * layout.data)),
        micro_batch=recipe.training.micro_batch_size, global_batch=recipe.training.global_batch_size,
        vocab_multiple=d,
        overrides=list(overrides))
    if not report.ok:
        report.suggestion = suggest_layout(recipe, shapes, layout, gpus_per_node, gpu_memory_gb * GIB, estimate)
    return report


def suggest_layout(recipe: Recipe, shapes: Sequence[ModelShape], current: Layout, gpus_per_node: int,
                   limit_bytes: float, estimate) -> Optional[tuple[Layout, MemoryEstimate]]:
    """The valid layout that fits with the least model parallelism.

    Searches TP in {1, 2, 4, 8} (at most a node), every PP dividing the GPU count, the
    distributed optimizer and sequence parallelism on and off. Ranked by TP x PP, then
    PP, then TP, then the number of switches changed from ``current``, then memory.
    """
    world = current.world
    found = []
    for tp in TP_CHOICES:
        if tp > gpus_per_node or world % tp:
            continue
        for pp in range(1, world // tp + 1):
            if (world // tp) % pp:
                continue
            for dist_opt in (False, True):
                for sp in ((False, True) if tp > 1 else (False,)):
                    lay = Layout(tp, pp, world, dist_opt, sp)
                    if check_layout(recipe, shapes, lay):
                        continue
                    mem = estimate(lay)
                    if mem.peak > limit_bytes:
                        continue
                    changed = (dist_opt != current.distributed_optimizer) + (sp != current.sequence_parallel)
                    found.append(((tp * pp, pp, tp, changed, mem.peak), lay, mem))
    if not found:
        return None
    _, lay, mem = min(found, key=lambda item: item[0])
    return lay, mem
