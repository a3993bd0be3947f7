"""A teacher on its own ranks (docs/separate_teacher.md): rank split, routing, checks, planner; and on 4 gloo processes
the equivalence with the co-located teacher, resume, and stops on SIGUSR1.

One 4-process group for the module (:func:`four_rank_body`, started once by the ``runs`` fixture):

* co-located references: the same recipes at TP=1 PP=1 (DP=4) for ``forward_kl`` and ``csd``;
* ``recipes/tiny/separate_teacher_dp2.yaml`` (student DP=2, teacher TP=2) and
  ``recipes/tiny/separate_teacher_pp2.yaml`` (student TP=2, teacher PP=2), both objectives, 5 steps
  with an evaluation at step 5;
* SIGUSR1 sent to a teacher rank (dp2 layout) and to a student rank (pp2 layout), each run then resumed.

Everything else is single-process arithmetic. Worker bodies live at module top level (spawned processes
import this module).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from distill_plugins.engine.teacher_ranks import (PayloadHeader, SeparateLayout, check_payload_header,
                                                  header_destinations, logits_bytes_per_token,
                                                  payload_bytes_per_token, routing_table, separate_teacher_errors,
                                                  teacher_items, weight_routes)
from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.recipe.load import load_recipe
from distill_plugins.recipe.schema import ParallelSpec, Recipe, TeacherParallelSpec, TrainingSpec, padded_vocab_size
from distill_plugins.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DP2 = ROOT / "recipes/tiny/separate_teacher_dp2.yaml"
PP2 = ROOT / "recipes/tiny/separate_teacher_pp2.yaml"
CLUSTER = ROOT / "recipes/cluster/qwen2.5-32b-to-qwen2.5-1.5b_csd_t24tp8pp1-tp1pp1-4x8.yaml"
STEPS = 5
OBJECTIVES = {"forward_kl": "objective=forward_kl", "csd": "objective={name: csd, w1: U, w2: S}"}


# ---------------------------------------------------------------------------
# 4 processes
# ---------------------------------------------------------------------------


#: student data-parallel size of each layout; the evaluation set is eval_batches x micro batch x DP samples
STUDENT_DP = {"colocated": 4, "dp2": 2, "pp2": 1}


def _recipe(path: Path, out: str, overrides, *, student_dp: int):
    # the same 8 held-out samples whatever the student's DP size, so the evaluations compare
    return load_recipe(path, [f"output_dir={out}", f"training.steps={STEPS}", "training.warmup_steps=0",
                              "training.eval_interval=5", f"training.eval_batches={4 // student_dp}",
                              "checkpoint.interval=0", "checkpoint.resume=none", *overrides])


def _reset():
    from megatron.core import parallel_state as ps

    from distill_plugins.engine import process_groups

    if ps.model_parallel_is_initialized():
        process_groups.destroy()


def _sharpen(model):
    # A random teacher at std 0.02 is almost uniform; scale its logits so there is something to learn.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "output_layer.weight":
                p.mul_(20.0)


def _recorder():
    from distill_plugins.engine.callbacks import Callback

    class Recorder(Callback):
        def __init__(self):
            self.steps, self.evals = [], []

        def on_step_end(self, engine, result):
            m = result.metrics
            self.steps.append({k: m[k] for k in ("step", "loss", "grad_norm", "teacher_wait_s") if k in m})

        def on_eval(self, engine, metrics):
            self.evals.append(dict(metrics))

    return Recorder()


def _signal_at(step: int, pid: int):
    from distill_plugins.engine.callbacks import Callback

    class SignalAt(Callback):
        def on_step_end(self, engine, result):
            if result.step == step:
                os.kill(pid, signal.SIGUSR1)

    return SignalAt()


def _colocated(path: Path, out: str, overrides) -> dict:
    from distill_plugins.engine.run import Engine

    _reset()
    recipe, host = _recipe(path, out, ["teacher_parallel=null", "parallel.tensor=1", "parallel.pipeline=1",
                                       *overrides], student_dp=STUDENT_DP["colocated"])
    rec = _recorder()
    engine = Engine(recipe, host, cpu=True, callbacks=[rec])
    _sharpen(engine.trainer.stage.teacher)
    status = engine.train()
    return {"status": status, "steps": rec.steps, "evals": rec.evals}


def _separate(path: Path, out: str, overrides, callbacks=(), poison: bool = False, mismatch: bool = False) -> dict:
    from distill_plugins.engine.remote_teacher import SeparateRun
    from distill_plugins.engine.role_groups import initialize_roles
    from distill_plugins.engine.run import Engine, resolve_specs, resolve_vocab_sizes
    from distill_plugins.models.sources import assert_frozen

    _reset()
    recipe, host = _recipe(path, out, overrides, student_dp=STUDENT_DP["dp2" if path == DP2 else "pp2"])
    resolved = resolve_specs(recipe)
    roles = initialize_roles(resolved, cpu=True)
    rec = _recorder()
    run = SeparateRun(resolved, roles, cpu=True, vocab_size=resolve_vocab_sizes(resolved)[0],
                      build_student=lambda provider: Engine(recipe, host, cpu=True, teacher_provider=provider,
                                                            callbacks=[rec, *callbacks]))
    if roles.is_teacher:
        _sharpen(run.side.model)
    elif mismatch:  # the students expect another teacher width than the teacher ranks send
        run.teacher_provider.header = dataclasses.replace(run.teacher_provider.header, hidden_size=48)
    run.connect()
    if poison and run.teacher_provider is not None and run.teacher_provider.weight is not None:
        run.teacher_provider.weight[0].fill_(float("nan"))  # the teacher's logit of token 0 is NaN on every row
    status = run.train()
    out_ = {"status": status, "role": roles.role.role, "steps": rec.steps, "evals": rec.evals}
    out_["saved_step"] = run.side.last_saved_step
    if roles.is_teacher:
        assert_frozen(run.side.model)
        out_["teacher_step"] = run.side.step
        out_["has_optimizer"] = hasattr(run.side, "optimizer")
    else:
        out_["student_step"] = run.side.trainer.step
        out_["has_teacher"] = run.side.trainer.stage.teacher is not None
    return out_


def four_rank_body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.engine.trainer import NonFiniteLossError

    enable_cpu_mode()
    pids = [None] * world
    torch.distributed.all_gather_object(pids, os.getpid())
    res: dict = {"rank": rank}
    for obj, override in OBJECTIVES.items():
        res[f"colocated/{obj}"] = _colocated(DP2, os.path.join(out, f"co_{obj}"), [override])
        for name, path in (("dp2", DP2), ("pp2", PP2)):
            res[f"{name}/{obj}"] = _separate(path, os.path.join(out, f"{name}_{obj}"), [override])
    # SIGUSR1 on a teacher rank (rank 3) after step 2: every rank stops at the next agreement, then resumes
    kill = [_signal_at(2, pids[3])] if rank == 0 else []
    res["dp2/signal"] = _separate(DP2, os.path.join(out, "dp2_signal"), [OBJECTIVES["forward_kl"]], kill)
    res["dp2/resumed"] = _separate(DP2, os.path.join(out, "dp2_signal"),
                                   [OBJECTIVES["forward_kl"], "checkpoint.resume=auto"])
    # SIGUSR1 on a student rank (rank 1) at step 2: it stops there
    kill = [_signal_at(2, pids[1])] if rank == 1 else []
    res["pp2/signal"] = _separate(PP2, os.path.join(out, "pp2_signal"), [OBJECTIVES["forward_kl"]], kill)
    res["pp2/resumed"] = _separate(PP2, os.path.join(out, "pp2_signal"),
                                   [OBJECTIVES["forward_kl"], "checkpoint.resume=auto"])
    # a payload header the students do not expect: every rank refuses to start, naming the key
    try:
        _separate(PP2, os.path.join(out, "pp2_mismatch"), [OBJECTIVES["forward_kl"]], mismatch=True)
        res["mismatch"] = None
    except DistillError as exc:
        res["mismatch"] = str(exc)
    # NaN teacher logits on the students: every rank skips, and after 2 in a row every rank stops together
    try:
        _separate(PP2, os.path.join(out, "pp2_nan"), [OBJECTIVES["forward_kl"], "training.max_consecutive_nonfinite=2"],
                  poison=True)
        res["nan"] = None
    except NonFiniteLossError as exc:
        res["nan"] = str(exc)
    _reset()
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("separate"))
    return {"ranks": run_distributed(four_rank_body, 4, args=(out,), timeout=900), "out": out}


def _losses(record: dict) -> list[float]:
    return [s["loss"] for s in record["steps"]]


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_separate_teacher_equals_colocated(runs, layout, objective):
    ref = runs["ranks"][0][f"colocated/{objective}"]
    for r in runs["ranks"][:2]:  # the student ranks report the same figures
        got = r[f"{layout}/{objective}"]
        assert got["status"] == 0 and got["role"] == "student" and not got["has_teacher"]
        assert len(got["steps"]) == len(ref["steps"]) == STEPS
        assert got["steps"][0]["loss"] == pytest.approx(ref["steps"][0]["loss"], rel=1e-5)
        assert got["steps"][0]["grad_norm"] == pytest.approx(ref["steps"][0]["grad_norm"], rel=1e-5)
        for step in range(1, STEPS):
            assert got["steps"][step]["loss"] == pytest.approx(ref["steps"][step]["loss"], rel=1e-3)
        assert got["evals"][0]["eval_kd_loss"] == pytest.approx(ref["evals"][0]["eval_kd_loss"], rel=1e-3)
        assert all(s["teacher_wait_s"] >= 0 for s in got["steps"])
    losses = _losses(ref)
    assert losses[-1] < losses[0], losses  # something was learned, so the comparison means something


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_teacher_ranks_run_forward_only_and_stay_in_step(runs, layout):
    for r in runs["ranks"][2:]:
        got = r[f"{layout}/forward_kl"]
        assert got["status"] == 0 and got["role"] == "teacher"
        assert got["teacher_step"] == STEPS and not got["has_optimizer"]


def test_sigusr1_on_a_teacher_rank_stops_every_rank_and_resume_is_exact(runs):
    ranks, out = runs["ranks"], Path(runs["out"])
    # rank 3 is signalled while the others finish step 2: every rank sees it at step 3's agreement
    for r in ranks:
        assert r["dp2/signal"]["status"] == 0
    assert [r["dp2/signal"]["student_step"] for r in ranks[:2]] == [3, 3]
    assert [r["dp2/signal"]["teacher_step"] for r in ranks[2:]] == [3, 3]
    assert [r["dp2/signal"]["saved_step"] for r in ranks] == [3, 3, 3, 3]
    assert (out / "dp2_signal" / "REQUEUE").read_text().strip() == "step=3"
    full = _losses(ranks[0]["dp2/forward_kl"])
    resumed = ranks[0]["dp2/resumed"]
    assert [s["step"] for s in resumed["steps"]] == [4, 5]
    assert _losses(resumed) == full[3:]  # bit-exact
    assert _losses(ranks[0]["dp2/signal"]) == full[:3]


def test_sigusr1_on_a_student_rank_stops_every_rank_and_resume_is_exact(runs):
    ranks, out = runs["ranks"], Path(runs["out"])
    for r in ranks:
        assert r["pp2/signal"]["status"] == 0
    assert [r["pp2/signal"]["student_step"] for r in ranks[:2]] == [2, 2]
    assert [r["pp2/signal"]["teacher_step"] for r in ranks[2:]] == [2, 2]
    assert [r["pp2/signal"]["saved_step"] for r in ranks] == [2, 2, 2, 2]
    assert (out / "pp2_signal" / "REQUEUE").read_text().strip() == "step=2"
    full = _losses(ranks[0]["pp2/forward_kl"])
    resumed = ranks[0]["pp2/resumed"]
    assert [s["step"] for s in resumed["steps"]] == [3, 4, 5]
    assert _losses(resumed) == full[2:]  # bit-exact
    assert resumed["evals"][0]["eval_kd_loss"] == ranks[0]["pp2/forward_kl"]["evals"][0]["eval_kd_loss"]


def test_payload_header_mismatch_stops_every_rank_naming_the_key(runs):
    for r in runs["ranks"]:
        assert r["mismatch"] is not None, "a mismatched payload header started training"
        assert "the teacher ranks send teacher.hidden_size=64, the student ranks expect teacher.hidden_size=48" \
            in r["mismatch"]


def test_nan_teacher_logits_stop_every_rank_together(runs):
    for r in runs["ranks"]:
        assert r["nan"] is not None and "2 consecutive steps" in r["nan"], r["nan"]
        assert "max_consecutive_nonfinite=2" in r["nan"]


def test_checkpoints_hold_no_teacher_state(runs):
    ck = Path(runs["out"]) / "pp2_forward_kl" / "checkpoints" / "step_000005"
    meta = json.loads((ck / "metadata.json").read_text())
    assert meta["world_size"] == 4
    assert meta["layout"] == {"tp": 2, "pp": 1, "dp": 1, "teacher": {"ranks": 2, "tp": 1, "pp": 2, "dp": 1}}
    for rank in (2, 3):
        state = torch.load(ck / f"rank_{rank:05d}.pt", weights_only=False)
        assert state["model"] is None and state["optimizer"] is None and state["scheduler"] is None
        assert state["extra"]["role"] == "teacher" and state["extra"]["step"] == 5
    student = torch.load(ck / "rank_00000.pt", weights_only=False)
    assert not any("teacher" in k for k in student["model"])


# ---------------------------------------------------------------------------
# One process: arithmetic, checks, planner
# ---------------------------------------------------------------------------


def _layout(world: int, *, tp=1, pp=1, t_ranks=2, t_tp=1, t_pp=1) -> SeparateLayout:
    recipe = Recipe(parallel=ParallelSpec(tensor=tp, pipeline=pp),
                    teacher_parallel=TeacherParallelSpec(ranks=t_ranks, tensor=t_tp, pipeline=t_pp),
                    training=TrainingSpec(micro_batch_size=1, global_batch_size=48))
    return SeparateLayout.from_recipe(recipe, world)


@pytest.mark.parametrize("world,kw", [(4, dict(t_tp=2)), (4, dict(tp=2, t_pp=2)), (12, dict(tp=2, t_ranks=8, t_tp=2, t_pp=2)),
                                      (10, dict(pp=2, t_ranks=6, t_tp=3))])
def test_routing_table_delivers_each_microbatch_once_in_order(world, kw):
    layout = _layout(world, **kw)
    s, t = layout.student, layout.teacher
    micro = 3
    routes = routing_table(layout, micro)
    for d in range(s.data):
        for i in range(s.tensor):
            dst = s.rank(tp=i, dp=d, pp=s.pipeline - 1)
            mine = [r for r in routes if r.dst == dst]
            assert [r.micro for r in mine] == list(range(micro))  # every microbatch of its replica, in order
            assert all(r.student_dp == d and r.src in t.last_stage_ranks() for r in mine)
    counts = [len(teacher_items(layout, e, micro)) for e in range(t.data)]
    assert sum(counts) == s.data * micro and max(counts) - min(counts) <= 1  # teacher replicas share the work
    for e in range(t.data):  # a replica computes exactly what it sends
        sent = {(r.micro, r.student_dp) for r in routes if r.teacher_dp == e}
        assert sent == set(teacher_items(layout, e, micro))


def test_rank_order_is_megatrons_with_an_offset():
    from megatron.core.parallel_state import RankGenerator

    layout = _layout(12, tp=2, t_ranks=8, t_tp=2, t_pp=2)
    for role in (layout.student, layout.teacher):
        gen = RankGenerator(tp=role.tensor, ep=1, dp=role.data, pp=role.pipeline, cp=1, order="tp-cp-ep-dp-pp",
                            rank_offset=role.offset)
        for group in gen.get_ranks("tp"):
            assert [role.coords(r)[0] for r in group] == list(range(role.tensor))
        for group in gen.get_ranks("pp"):
            assert [role.coords(r)[2] for r in group] == list(range(role.pipeline))
        for r in role.ranks:
            tp, dp, pp = role.coords(r)
            assert role.rank(tp=tp, dp=dp, pp=pp) == r
    assert layout.student.ranks == range(0, 4) and layout.teacher.ranks == range(4, 12)


@pytest.mark.parametrize("t_tp,tp", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_weight_routes_cover_each_student_shard_once(t_tp, tp):
    layout = _layout(tp * 2 + t_tp, tp=tp, t_ranks=t_tp, t_tp=t_tp)
    vocab, d = 250, 16
    rows = padded_vocab_size(vocab, d, tp) // tp
    routes = weight_routes(layout, vocab_size=vocab, make_vocab_size_divisible_by=d)
    for dst in layout.student.last_stage_ranks():
        i = layout.student.coords(dst)[0]
        covered = sorted((w.start, w.stop) for w in routes if w.dst == dst)
        expect_lo, expect_hi = i * rows, min((i + 1) * rows, vocab)
        assert covered[0][0] == expect_lo and covered[-1][1] == expect_hi
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no overlap
        senders = [s for s in layout.teacher.ranks if dst in header_destinations(layout, s)]
        assert len(senders) == 1 and senders[0] in layout.teacher.last_stage_ranks()  # one header per receiver


def test_payload_header_mismatch_names_the_keys():
    want = PayloadHeader(seq_length=32, micro_batch_size=2, hidden_size=64, precision="bf16", vocab_size=250)
    got = PayloadHeader.decode(PayloadHeader(seq_length=32, micro_batch_size=2, hidden_size=48, precision="fp32",
                                             vocab_size=250).encode())
    errors = check_payload_header(want, got)
    assert len(errors) == 2
    assert "teacher.hidden_size=48" in errors[0] and "teacher.hidden_size=64" in errors[0]
    assert "training.precision='fp32'" in errors[1]
    assert check_payload_header(want, PayloadHeader.decode(want.encode())) == []


def test_payload_is_smaller_than_logits():
    # Qwen2.5-32B -> 1.5B in bf16: 5120 x 2 B of hidden state against 151665 x 2 B of logits per token
    assert payload_bytes_per_token(5120, "bf16") == 10240
    assert logits_bytes_per_token(151665, "bf16") == 303330
    assert payload_bytes_per_token(64, "fp32") == 256


@pytest.mark.parametrize("overrides,message", [
    (["teacher_parallel.ranks=4"], "teacher_parallel.ranks=4 leaves no student rank in a world of 4"),
    (["teacher_parallel.ranks=1", "teacher_parallel.tensor=1", "teacher_parallel.pipeline=1"],
     "is not a multiple of parallel.tensor x parallel.pipeline = 2 x 1"),
    (["teacher_parallel.tensor=3", "teacher_parallel.ranks=3", "teacher_parallel.pipeline=1"], "teacher.num_attention_heads=4 is not divisible by "
                                                                "teacher_parallel.tensor=3"),
    (["teacher_parallel.pipeline=2", "teacher_parallel.ranks=2", "teacher.num_layers=3"],
     "teacher.num_layers=3 is not divisible by teacher_parallel.pipeline=2"),
    (["teacher_parallel.tensor=1", "teacher_parallel.pipeline=1", "teacher_parallel.ranks=2",
      "training.global_batch_size=6"], "do not split evenly over the teacher's 2 data-parallel replicas"),
    (["loss.kd_weight=0", "loss.ce_weight=1"], "teacher_parallel needs loss.kd_weight > 0"),
    (["teacher.checkpoint=/nowhere"], "teacher.checkpoint: weights from a megatron checkpoint"),
])
def test_bad_layouts_name_the_keys(overrides, message):
    data_overrides = ["output_dir=/tmp/unused"] + overrides
    try:
        recipe, _ = load_recipe(PP2, data_overrides)
    except RecipeError as exc:  # distill check already refuses it
        assert any(message in e for e in exc.errors), exc.errors
        return
    errors = separate_teacher_errors(recipe, world=4)
    assert any(message in e for e in errors), errors


def test_schema_refuses_ranks_that_do_not_divide():
    with pytest.raises(ValueError, match=r"teacher_parallel.ranks=3 is not divisible by teacher_parallel.tensor x "
                                         r"teacher_parallel.pipeline = 2 x 1"):
        TeacherParallelSpec(ranks=3, tensor=2)


def test_cluster_recipe_checks_and_plans():
    from distill_plugins.cli import main
    from distill_plugins.cli.plan import plan_recipe

    assert main(["check", str(CLUSTER)]) == 0
    report = plan_recipe(CLUSTER, nodes=4, gpus_per_node=8)
    assert report.ok, report.format()
    assert (report.layout.tensor, report.layout.data) == (1, 8)
    assert (report.teacher_layout.tensor, report.teacher_layout.pipeline, report.teacher_layout.data) == (8, 1, 3)
    text = report.format()
    assert "teacher on its own ranks" in text and "payload per token: teacher hidden state 10240 B" in text
    names = {line.name for line in report.memory.lines}
    assert {"teacher out layer", "payload in", "teacher weights", "payload out"} <= names
    assert report.memory.line("teacher weights").bytes[0] == 0  # no teacher weights on student ranks
    assert report.memory.line("student weights").bytes[-1] == 0  # and no student weights on teacher ranks
    bad = plan_recipe(CLUSTER, nodes=3, gpus_per_node=8)
    assert not bad.ok and any("teacher_parallel.ranks=24 leaves no student rank" in e for e in bad.errors)


def test_colocated_planner_refuses_a_separate_recipe():
    from distill_plugins.cli.plan import load_for_plan
    from distill_plugins.plan import plan

    with pytest.raises(DistillError, match="plan_separate"):
        plan(load_for_plan(CLUSTER), nodes=4, gpus_per_node=8)
