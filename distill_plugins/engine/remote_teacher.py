"""A teacher on ranks of its own: the teacher ranks' loop and the student's receiver.

Design
------
With ``teacher_parallel`` (docs/separate_teacher.md) :func:`start_separate`
installs each process's role (:func:`.role_groups.initialize_roles`) and builds
a :class:`SeparateRun` around one of two things:

* on **student ranks**, the usual :class:`~distill_plugins.engine.run.Engine`
  (built by the caller) whose trainer builds no teacher and gets a
  :class:`RemoteTeacher` instead: on the student's last stage, for every
  microbatch the loss needs, it waits for the teacher's payload (the teacher's
  final hidden states after its final norm, ``[s, b, h_t]`` in the training
  precision, and the ``b`` sample ids), checks the ids against the batch and
  computes the teacher's logits with its frozen copy of the teacher's output
  layer, vocab-parallel over the student's TP group like the student's own:
  ``z_t = h_t W_t^T``, ``[b, s, V/TP_s]``. Objectives, selectors, temperature
  policies and the NaN guard then run exactly as with a co-located teacher.
  The time spent waiting is added up per step (``teacher_wait_s``);
* on **teacher ranks**, a :class:`TeacherServer`: the teacher (built, loaded and
  frozen as usual, under its own TP x PP), the same training and evaluation
  microbatches the students read (:func:`.teacher_ranks.teacher_items`), and a
  loop that runs the teacher forward-only (megatron's schedule with
  ``forward_only=True``, under ``torch.no_grad()``) and sends each payload to the
  student ranks the routing table names (``torch.distributed`` ``isend``/``irecv``
  on the payload group). It holds no gradient, no optimizer state and writes no
  student state.

**The two roles stay in step through the world's collectives.** A process group
spans the job, so every collective the student engine runs over the whole world
(megatron's ``dist_checkpointing`` only knows the whole world) is run by the
teacher ranks at the same point, with their own contribution:

=============================  ==================================================
student (``Engine``)           teacher (:class:`TeacherServer`)
=============================  ==================================================
resume agreement, data, load   the same: ``resolve_resume``, the same data
                               builders, its own rank file, the load agreement
optimizer (megatron aligns     an empty list of parameter groups, as many times
parameter groups over the      as ``get_megatron_optimizer`` gathers (two)
world)
start-up agreement             the same (:func:`agree_start`), then the output
                               layer's rows and a payload header go to the
                               students, who check it; the verdict is agreed
stop agreement (train start)   its own stop flag
training step ``n``            the payloads of step ``n``; the NaN-guard
                               agreement (the teacher votes "fine": payloads are
                               checked where they are used, on the student's valid
                               rows, as a co-located teacher's logits are)
stop agreement (step end)      its own stop flag: SIGUSR1/SIGTERM on a teacher
                               rank stops every rank at the same step
non-finite streak              the same error at the same step
evaluation                     the evaluation's payloads
checkpoint                     the same collective save, writing only its own rank
                               file (data position, counters; no weights)
=============================  ==================================================

**One step ahead.** With ``teacher_parallel.lookahead`` (default) the teacher
computes step ``n+1``'s payloads while the students train step ``n``, and posts
them when step ``n+1`` starts, after step ``n``'s agreements said "go on": the
payloads of at most two steps are alive on a teacher's last stage (the ones
being received, the ones being computed), and a stop or an error never leaves a
send without its receive. Without lookahead each step is computed after the
previous one's agreements, each microbatch sent as soon as it is ready.

Usage (what ``engine.run.run`` does)::

    run = start_separate(recipe, cpu=True, vocab_size=V,
                         build_student=lambda provider: Engine(recipe, host, cpu=True, teacher_provider=provider))
    run.train()
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func

from distill_plugins.checkpoint.integrity import agree_errors
from distill_plugins.checkpoint.run_checkpoint import (checkpoint_directory, load_checkpoint, resolve_resume,
                                                       save_checkpoint)
from distill_plugins.data.iterators import EvalData, MicrobatchIterator, build_data, build_eval_data
from distill_plugins.engine.role_groups import Roles, initialize_roles
from distill_plugins.engine.signals import StopSignals, current_stop_handlers
from distill_plugins.engine.stage import position_ids_for
from distill_plugins.engine.teacher_ranks import (PayloadHeader, Route, check_payload_header, header_destinations,
                                                  header_source,
                                                  microbatches_per_step, routing_table, separate_teacher_errors,
                                                  teacher_items, weight_routes)
from distill_plugins.engine.trainer import NonFiniteLossError
from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.logging import get_logger
from distill_plugins.models.build import model_layout
from distill_plugins.models.sources import build_teacher
from distill_plugins.recipe.schema import ParallelSpec, Recipe, padded_vocab_size

__all__ = ["RemoteTeacher", "TeacherServer", "SeparateRun", "start_separate", "agree_start", "hidden_states_only"]

log = get_logger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: point-to-point tags on the payload group (gloo matches on them; NCCL keeps posting order)
_TAG_HEADER = 7
_TAG_WEIGHT = 16  # + teacher TP rank
#: world-wide all_gather_object calls in megatron-core 0.16's get_megatron_optimizer for one model chunk
#: (optimizer/__init__.py, _get_param_groups: the dense parameters, then the expert ones)
_OPTIMIZER_WORLD_GATHERS = 2


def agree_start(error: Optional[BaseException]) -> None:
    """Agree over the world that every process started; raise the same error everywhere if not.

    Called by both roles at the same point of start-up, whatever happened locally, so a
    failure on one rank (a bad weight file, a data error) stops every rank instead of
    leaving the other role waiting for a payload.
    """
    failed = agree_errors(None if error is None else f"rank {dist.get_rank()}: {type(error).__name__}: {error}")
    if failed:
        if error is not None:
            raise error
        raise DistillError("start-up failed on other ranks: " + "; ".join(failed))


def _expected_header(recipe: Recipe, vocab_size: int) -> PayloadHeader:
    return PayloadHeader(seq_length=recipe.data.seq_length, micro_batch_size=recipe.training.micro_batch_size,
                         hidden_size=recipe.teacher.hidden_size, precision=recipe.training.precision,
                         vocab_size=vocab_size)


@contextlib.contextmanager
def hidden_states_only(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Make a last-stage GPTModel return its final hidden states ``[s, b, h]`` instead of logits.

    megatron's ``GPTModel`` applies the final norm inside its decoder and returns the
    decoder's output when ``post_process`` is False; the flag is switched off for the
    call only, so the teacher never computes logits the students compute themselves.
    """
    if not enabled or not getattr(model, "post_process", False):
        yield
        return
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


# ---------------------------------------------------------------------------
# Student side
# ---------------------------------------------------------------------------


@dataclass
class _Pending:
    kind: str
    route: Route
    ids: torch.Tensor
    hidden: torch.Tensor
    works: list


class RemoteTeacher:
    """The student's side of a teacher on its own ranks: receives payloads, computes the teacher's logits.

    Args:
        recipe: the resolved recipe (``teacher.hidden_size`` set).
        roles: this student rank's :class:`~.role_groups.Roles`.
        vocab_size: the real vocabulary (one tokenizer for both models).

    The trainer calls :meth:`logits` from its loss function on the last stage (the
    microbatches of a job arrive in order) and adds :meth:`report_items` to the
    microbatch's report; :meth:`metrics` turns the reduced sums into ``teacher_wait_s``.
    """

    #: additive report keys (summed over microbatches and DP ranks by the trainer)
    report_keys = ("teacher_wait_s",)

    def __init__(self, recipe: Recipe, roles: Roles, *, vocab_size: int):
        self.recipe, self.roles, self.vocab_size = recipe, roles, vocab_size
        self.layout = roles.layout
        self.is_receiver = roles.is_last_stage
        self.dtype = _DTYPES[recipe.training.precision]
        self.header = _expected_header(recipe, vocab_size)
        self.weight: Optional[torch.Tensor] = None  # [Vp_s / TP_s, h_t], this rank's shard of W_t
        me = roles.rank
        per_step = microbatches_per_step(recipe, self.layout.student.data)
        self._routes = {"train": [r for r in routing_table(self.layout, per_step) if r.dst == me],
                        "eval": [r for r in routing_table(self.layout, recipe.training.eval_batches) if r.dst == me]}
        self._queue: deque[_Pending] = deque()
        self._wait = 0.0

    # -- start-up ---------------------------------------------------------------
    def connect(self) -> None:
        """Check the teacher's payload header, then receive this rank's shard of its output layer (collective).

        Every rank calls it at the same point as :meth:`TeacherServer.connect`. The header is
        checked against this recipe (:func:`~.teacher_ranks.check_payload_header`) and the verdict
        agreed over the world before any weight moves: a mismatch raises the same
        :class:`DistillError`, naming the keys, on every rank.
        """
        errors: list[str] = []
        if self.is_receiver:
            header = torch.zeros(5, dtype=torch.int64)
            dist.recv(header, src=header_source(self.layout, self.roles.rank), group=self.roles.payload_group,
                      tag=_TAG_HEADER)
            errors = check_payload_header(self.header, PayloadHeader.decode(header.tolist()))
        agreed = agree_errors("; ".join(errors) if errors else None)
        if agreed:
            raise DistillError("teacher on its own ranks: " + "; ".join(agreed))
        if self.is_receiver:
            self.weight = self._receive_weight()

    def _receive_weight(self) -> torch.Tensor:
        """``[Vp / TP_s, h_t]``: the real rows from the teacher ranks that hold them (``weight_routes``), padding 0."""
        s = self.layout.student
        tp = self.roles.coords[0]
        d = self.recipe.parallel.make_vocab_size_divisible_by
        rows = padded_vocab_size(self.vocab_size, d, s.tensor) // s.tensor
        weight = torch.zeros(rows, self.header.hidden_size, dtype=self.dtype)
        for w in weight_routes(self.layout, vocab_size=self.vocab_size, make_vocab_size_divisible_by=d):
            if w.dst == self.roles.rank:
                lo = w.start - tp * rows
                dist.recv(weight[lo:lo + (w.stop - w.start)], src=w.src, group=self.roles.payload_group,
                          tag=_TAG_WEIGHT + w.teacher_tp)
        return weight

    # -- per microbatch ---------------------------------------------------------
    def _post(self, kind: str) -> None:
        s, b, h = self.header.shape
        for route in self._routes[kind]:
            ids = torch.empty(b, dtype=torch.int64)
            hidden = torch.empty(s, b, h, dtype=self.dtype)
            works = [dist.irecv(ids, src=route.src, group=self.roles.payload_group, tag=2 * route.index),
                     dist.irecv(hidden, src=route.src, group=self.roles.payload_group, tag=2 * route.index + 1)]
            self._queue.append(_Pending(kind, route, ids, hidden, works))

    def logits(self, batch: dict[str, torch.Tensor], *, training: bool) -> torch.Tensor:
        """The teacher's vocab-parallel logits ``[b, s, V/TP_s]`` for ``batch`` (last stage, in job order).

        The first call of a job (a training step when ``training``, else an evaluation)
        posts the receives of all its microbatches; each call then waits for its own.

        Raises:
            DistillError: the payload carries other samples than ``batch`` (a routing bug), or
                this rank is not on the student's last stage.
        """
        if not self.is_receiver or self.weight is None:
            raise DistillError("RemoteTeacher.logits is called on the student's last pipeline stage after connect()")
        kind = "train" if training else "eval"
        if not self._queue:
            self._post(kind)
        item = self._queue.popleft()
        if item.kind != kind:
            raise DistillError(f"teacher payloads out of step: a {kind} microbatch met a {item.kind} payload")
        t0 = time.perf_counter()
        for work in item.works:
            work.wait()
        self._wait += time.perf_counter() - t0
        expected = batch.get("sample_ids")
        if expected is not None and not torch.equal(expected.to(item.ids), item.ids):
            raise DistillError(f"teacher payload routing mismatch on rank {self.roles.rank}: microbatch "
                               f"{item.route.micro} of student DP rank {item.route.student_dp} holds samples "
                               f"{expected.tolist()}, the teacher sent {item.ids.tolist()}")
        with torch.no_grad():
            logits = F.linear(item.hidden, self.weight)  # [s, b, V_local]: the output layer's matmul
        return logits.transpose(0, 1).contiguous()

    def report_items(self) -> dict[str, torch.Tensor]:
        """The wait of the microbatch just served (seconds, fp64), for the microbatch report."""
        wait, self._wait = self._wait, 0.0
        return {"teacher_wait_s": torch.tensor(wait, dtype=torch.float64)}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``teacher_wait_s``: seconds a student replica's last stage waited for payloads this step (mean over DP)."""
        return {"teacher_wait_s": sums.get("teacher_wait_s", 0.0) / self.layout.student.data}

    def layout_record(self) -> dict:
        """The layout the checkpoints of this run carry (both roles)."""
        return self.layout.record()


# ---------------------------------------------------------------------------
# Teacher side
# ---------------------------------------------------------------------------


@dataclass
class _Job:
    """The payloads of one job on this teacher rank: sends posted, or held for later (lookahead)."""

    held: list = field(default_factory=list)  # (tensor, dst, tag)
    works: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # tensors of posted sends, alive until they complete

    def post(self, group) -> None:
        for tensor, dst, tag in self.held:
            self.works.append(dist.isend(tensor, dst=dst, group=group, tag=tag))
            self.keep.append(tensor)
        self.held = []

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.keep = [], []


class TeacherServer:
    """The teacher ranks' side: forward-only teacher, payload sends, and the loop mirroring the students'.

    Built by :class:`SeparateRun` (collective with the students' start-up), then
    :meth:`connect` and :meth:`train`.
    """

    def __init__(self, recipe: Recipe, roles: Roles, *, vocab_size: int, cpu: bool,
                 signals: Optional[StopSignals] = None):
        self.recipe, self.roles, self.vocab_size, self.cpu = recipe, roles, vocab_size, cpu
        self.layout = roles.layout
        tpar = recipe.teacher_parallel
        self.parallel = ParallelSpec(tensor=tpar.tensor, pipeline=tpar.pipeline,
                                     make_vocab_size_divisible_by=recipe.parallel.make_vocab_size_divisible_by)
        self.lookahead = tpar.lookahead
        self.step = 0
        self.last_saved_step: Optional[int] = None
        self.nonfinite_skips = 0
        self.consecutive_nonfinite = 0
        self.header = _expected_header(recipe, vocab_size)
        tp, dp, pp = roles.coords
        self.tp_rank, self.dp_rank = tp, dp
        self.is_last_stage = roles.is_last_stage
        s = self.layout.student
        self.per_step = microbatches_per_step(recipe, s.data)
        # same order as the student engine: checkpoint directory and resume, then data, then the model
        self.ckpt_dir = checkpoint_directory(recipe)
        self.resume_path = resolve_resume(recipe.checkpoint.resume, self.ckpt_dir)
        first = build_data(recipe, dp_rank=0, dp_size=s.data)
        self.train_data = [first] + [
            MicrobatchIterator(first.source, micro_batch_size=recipe.training.micro_batch_size, dp_rank=d,
                               dp_size=s.data, kind=recipe.data.kind, split="train") for d in range(1, s.data)]
        self.eval_data: Optional[list[EvalData]] = None
        self._boundary_state: dict[int, list] = {}
        self.model = build_teacher(recipe.teacher, self.parallel, vocab_size=vocab_size,
                                   precision=recipe.training.precision, cpu=cpu, seed=recipe.seed + 1)
        self.signals = signals or current_stop_handlers() or StopSignals()
        # the students' get_megatron_optimizer aligns parameter groups over the whole world: one
        # all_gather_object of group keys for the dense chunk, one for expert parameters; the teacher has none
        for _ in range(_OPTIMIZER_WORLD_GATHERS):
            dist.all_gather_object([None] * dist.get_world_size(), [])
        if self.resume_path is not None:
            self.load(self.resume_path)
        me = roles.rank
        self._routes = {kind: self._my_routes(kind, me) for kind in ("train", "eval")}

    def _my_routes(self, kind: str, me: int) -> dict[tuple[int, int], list[Route]]:
        n = self.per_step if kind == "train" else self.recipe.training.eval_batches
        out: dict[tuple[int, int], list[Route]] = {}
        for r in routing_table(self.layout, n):
            if r.src == me:
                out.setdefault((r.micro, r.student_dp), []).append(r)
        return out

    # -- start-up ---------------------------------------------------------------
    def connect(self) -> None:
        """Send the payload header, agree on the students' verdict, then send the output layer's rows.

        The collective counterpart of :meth:`RemoteTeacher.connect`; only teacher replica 0's last
        stage sends anything.
        """
        sender = self.is_last_stage and self.dp_rank == 0
        me, model, group = self.roles.rank, self.model, self.roles.payload_group
        if sender:
            header = torch.tensor(PayloadHeader(
                seq_length=self.recipe.data.seq_length, micro_batch_size=self.recipe.training.micro_batch_size,
                hidden_size=model.config.hidden_size, precision=self.recipe.training.precision,
                vocab_size=model_layout(model).vocab_size).encode(), dtype=torch.int64)
            for work in [dist.isend(header, dst=dst, group=group, tag=_TAG_HEADER)
                         for dst in header_destinations(self.layout, me)]:
                work.wait()
        agreed = agree_errors(None)
        if agreed:
            raise DistillError("teacher on its own ranks: " + "; ".join(agreed))
        if sender:
            weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
                else model.output_layer.weight
            rows = model_layout(model).padded_vocab_size // self.parallel.tensor
            works, keep = [], []
            for w in weight_routes(self.layout, vocab_size=self.vocab_size,
                                   make_vocab_size_divisible_by=self.parallel.make_vocab_size_divisible_by):
                if w.src == me:
                    lo = w.start - self.tp_rank * rows
                    keep.append(weight.detach()[lo:lo + (w.stop - w.start)].contiguous())
                    works.append(dist.isend(keep[-1], dst=w.dst, group=group, tag=_TAG_WEIGHT + w.teacher_tp))
            for work in works:
                work.wait()

    # -- data -------------------------------------------------------------------
    def _read_train(self, step: int) -> list[list[dict]]:
        """``batches[m][d]``: step ``step``'s microbatches of every student DP rank (all are read, to stay in step)."""
        self._boundary_state[step] = [it.state_dict() for it in self.train_data]
        for old in [k for k in self._boundary_state if k < step - 1]:
            del self._boundary_state[old]
        return [[next(it) for it in self.train_data] for _ in range(self.per_step)]

    def _read_eval(self) -> list[list[dict]]:
        if self.eval_data is None:
            s = self.layout.student
            first = build_eval_data(self.recipe, dp_rank=0, dp_size=s.data, split="valid")
            self.eval_data = [first] + [
                EvalData(first.source, micro_batch_size=self.recipe.training.micro_batch_size, dp_rank=d,
                         dp_size=s.data, num_microbatches=len(first), kind=self.recipe.data.kind, split="valid")
                for d in range(1, s.data)]
        its = [iter(ev) for ev in self.eval_data]
        return [[next(it) for it in its] for _ in range(len(self.eval_data[0]))]

    # -- compute ----------------------------------------------------------------
    @torch.no_grad()
    def _compute(self, kind: str, batches: list[list[dict]], *, stream: bool) -> _Job:
        """Run this replica's share of a job forward-only; payloads are sent (``stream``) or held."""
        job = _Job()
        n = len(batches)
        items = teacher_items(self.layout, self.dp_rank, n)
        if not items:
            return job
        routes = self._routes[kind]
        group = self.roles.payload_group
        expected = self.header.shape

        def sink(item, hidden):
            if tuple(hidden.shape) != expected:
                raise DistillError(f"teacher hidden states have shape {tuple(hidden.shape)}, the payload is "
                                   f"[data.seq_length, training.micro_batch_size, teacher.hidden_size] = "
                                   f"{list(expected)}")
            hidden = hidden.contiguous()
            m, d = item
            ids = batches[m][d]["sample_ids"]
            for r in routes.get(item, []):
                for tensor, tag in ((ids, 2 * r.index), (hidden, 2 * r.index + 1)):
                    job.held.append((tensor, r.dst, tag))
            if stream:
                job.post(group)
            return torch.zeros(()), {}

        def forward_step(data_iterator, model):
            item, batch = next(data_iterator)
            tokens = batch["tokens"]
            with hidden_states_only(model):
                out = model(tokens, batch.get("position_ids", position_ids_for(tokens)), None)
            return out, partial(sink, item)

        self.model.eval()
        fb = get_forward_backward_func()
        fb(forward_step_func=forward_step, data_iterator=iter([(it, batches[it[0]][it[1]]) for it in items]),
           model=[self.model], num_microbatches=len(items), seq_length=self.recipe.data.seq_length,
           micro_batch_size=self.recipe.training.micro_batch_size, forward_only=True)
        return job

    # -- the loop ---------------------------------------------------------------
    def train(self, steps: Optional[int] = None) -> int:
        """Serve the students until ``steps`` (default ``training.steps``) or a stop; returns 0.

        Mirrors :meth:`distill_plugins.engine.run.Engine.train` collective for collective
        (module docstring): the stop agreement before the first step; per step the
        payloads, the NaN-guard agreement, the stop agreement, the students' check of
        the non-finite streak, the evaluation's payloads, the collective save.

        Raises:
            NonFiniteLossError: when the students stop on too many skipped steps in a row.
        """
        t = self.recipe.training
        rc = self.recipe.checkpoint
        end = t.steps if steps is None else steps
        group = self.roles.payload_group
        pending: Optional[_Job] = None
        installed_here = not self.signals.installed
        if installed_here:
            self.signals.install()
        try:
            stop = self.signals.should_stop()  # StopOnSignal.on_train_start
            while self.step < end and not stop:
                if pending is None:
                    job = self._compute("train", self._read_train(self.step), stream=True)
                else:
                    job = pending
                    job.post(group)
                pending = None
                if self.lookahead and self.step + 1 < end:  # step n+1 while the students train step n
                    pending = self._compute("train", self._read_train(self.step + 1), stream=False)
                skipped = self._nan_guard_vote()
                job.wait()
                self.step += 1
                self.nonfinite_skips += int(skipped)
                self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0
                evaluate = bool(t.eval_interval) and self.step % t.eval_interval == 0
                save = bool(rc.interval and self.step % rc.interval == 0) or self.step >= end
                stop = self.signals.should_stop()  # StopOnSignal.on_step_end
                save = save or stop
                if self.consecutive_nonfinite >= t.max_consecutive_nonfinite:  # Trainer.check_nonfinite_streak
                    raise NonFiniteLossError(
                        f"{self.consecutive_nonfinite} consecutive steps had NaN/Inf losses or gradients on the "
                        f"student ranks (last: step {self.step}); the teacher ranks stop with them "
                        f"(training.max_consecutive_nonfinite={t.max_consecutive_nonfinite})")
                if evaluate:
                    self._compute("eval", self._read_eval(), stream=True).wait()
                if save:
                    self.save()
            if stop:
                log.warning("stop signal received: the teacher ranks stop at step %d with the students", self.step)
        finally:
            if installed_here:
                self.signals.restore()
        return 0

    @staticmethod
    def _nan_guard_vote() -> bool:
        """The students' NaN-guard agreement (``Trainer._agree``: a float MAX over the world); the teacher votes 0.

        The payloads are checked where they are used, on the student's valid rows, as a
        co-located teacher's logits are; a NaN in a masked position skips nothing.
        """
        flag = torch.zeros(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # -- checkpoints ------------------------------------------------------------
    def _data_state(self) -> list:
        return self._boundary_state.get(self.step) or [it.state_dict() for it in self.train_data]

    def save(self) -> Any:
        """Take part in the students' collective save; this rank's file holds no weights (collective)."""
        self.last_saved_step = self.step
        return save_checkpoint(
            self.ckpt_dir, self.step, data_state={"role": "teacher", "train": self._data_state()},
            extra={"role": "teacher", "step": self.step, "nonfinite_skips": self.nonfinite_skips,
                   "consecutive_nonfinite": self.consecutive_nonfinite},
            layout=self.layout.record(), keep=self.recipe.checkpoint.keep, sharded_model_state={})

    def load(self, path) -> None:
        """Restore the data position and counters from this rank's file of checkpoint ``path``.

        Collective like the students' ``Engine.load``: a failure on any rank raises on every rank.
        """
        error = None
        try:
            ck = load_checkpoint(path, layout=self.layout.record(), verify=False)  # resolve_resume verified it
            extra = ck.extra or {}
            if extra.get("role") != "teacher":
                raise DistillError(f"rank {self.roles.rank}'s file is not a teacher rank's; resume with the "
                                   "teacher_parallel layout the checkpoint was written with")
            for it, state in zip(self.train_data, ck.data_state["train"]):
                it.load_state_dict(state)
            self.step = int(extra["step"])
            self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))
            self.consecutive_nonfinite = int(extra.get("consecutive_nonfinite", 0))
        except Exception as exc:  # agreed below, as the students do
            error = f"rank {self.roles.rank}: {type(exc).__name__}: {exc}"
        errors = agree_errors(error)
        if errors:
            raise DistillError(f"cannot resume from {path}: {'; '.join(errors)}")
        log.info("teacher ranks resumed from %s at step %d", path, self.step)


# ---------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------


class SeparateRun:
    """This process's side of a run whose teacher has ranks of its own; ``train()`` like an ``Engine``.

    Args:
        recipe: the recipe with ``teacher_parallel``, shape keys resolved from the models' sources.
        roles: from :func:`.role_groups.initialize_roles`.
        cpu: the CPU layer is on.
        vocab_size: the real vocabulary (one tokenizer for both models).
        build_student: ``fn(provider) -> Engine`` building the student engine around the
            :class:`RemoteTeacher` (called on student ranks).
        signals: the stop-signal handlers (default: the process-wide ones, else new ones).

    Attributes:
        side: the student ``Engine`` or the :class:`TeacherServer`.
        teacher_provider: the :class:`RemoteTeacher` (student ranks) or None.

    Building is collective and agreed (:func:`agree_start`); then :meth:`connect` ships the
    teacher's output layer and checks the payload header, and :meth:`train` runs the loop.
    Between the two the teacher's weights may still be changed (``side.model`` on teacher ranks).
    """

    def __init__(self, recipe: Recipe, roles: Roles, *, cpu: bool, vocab_size: int,
                 build_student: Callable[[RemoteTeacher], Any], signals: Optional[StopSignals] = None):
        errors = separate_teacher_errors(recipe, world=roles.layout.world)
        if errors:
            raise RecipeError(errors)
        self.recipe, self.roles = recipe, roles
        self.side: Any = None
        self.teacher_provider: Optional[RemoteTeacher] = None
        error = None
        try:
            if roles.is_teacher:
                self.side = TeacherServer(recipe, roles, vocab_size=vocab_size, cpu=cpu, signals=signals)
            else:
                self.teacher_provider = RemoteTeacher(recipe, roles, vocab_size=vocab_size)
                self.side = build_student(self.teacher_provider)
        except Exception as exc:  # agreed below: every rank raises, none waits for a payload
            error = exc
        agree_start(error)

    def connect(self) -> None:
        """Ship the teacher's output layer to the students and check the payload header (collective)."""
        (self.side if self.roles.is_teacher else self.teacher_provider).connect()

    def train(self, steps: Optional[int] = None) -> int:
        """This side's loop (the two mirror each other); returns the exit status 0."""
        return self.side.train(steps)


def start_separate(recipe: Recipe, *, cpu: bool, vocab_size: int, build_student: Callable[[RemoteTeacher], Any],
                   signals: Optional[StopSignals] = None) -> SeparateRun:
    """Groups of both roles, this process's side, the weight transfer: a :class:`SeparateRun` ready to train.

    What ``distill run`` does for a ``teacher_parallel`` recipe (``recipe`` resolved).
    """
    roles = initialize_roles(recipe, cpu=cpu)
    run = SeparateRun(recipe, roles, cpu=cpu, vocab_size=vocab_size, build_student=build_student, signals=signals)
    run.connect()
    return run
