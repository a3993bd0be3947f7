"""End-to-end engine tests on CPU/gloo: TP x PP x DP training, parity, NaN guard.

Two process groups for the whole module: one 4-process job (TP=2 x PP=2
training, parity layouts, NaN guard) and one single-process reference
(TP=1 x PP=1). Worker bodies live at module top level (spawned processes import
this module).

Faults are injected through public seams only: the teacher is sharpened by
editing its (frozen) weights after the engine is built, NaN logits come from a
torch forward pre-hook on one rank's student output layer (its input), and the NaN-guard runs go
through the engine's own loop (``Engine.train``) with a callback that records
the steps.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB = 250
SEQ = 32
PARITY_STEPS = 3


def _recipe(tp: int, pp: int, *, steps: int, out: str, max_nonfinite: int = 5, lr: float = 3e-3):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, ModelSpec, ParallelSpec, PartSpec, Recipe,
                                               TrainingSpec)

    return Recipe(
        student=ModelSpec(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          vocab_size=VOCAB, max_position_embeddings=64, tie_embeddings=True),
        teacher=ModelSpec(arch="gpt2", num_layers=4, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=64),
        parallel=ParallelSpec(tensor=tp, pipeline=pp, make_vocab_size_divisible_by=16),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=steps, micro_batch_size=2, global_batch_size=8, lr=lr, warmup_steps=0,
                              lr_decay="constant", clip_grad=1.0, max_consecutive_nonfinite=max_nonfinite),
        checkpoint=CheckpointSpec(resume="none"),
        objective=PartSpec(name="forward_kl"),
        device="cpu", seed=7, output_dir=out,
    )


def _sharpen_teacher(model):
    # A random teacher at std 0.02 is almost uniform; scale its logits so there is something to learn.
    for name, p in model.named_parameters():
        if name == "output_layer.weight":
            p.mul_(20.0)


def _poison_logits(eng, when, scale=float("nan")):
    """A forward pre-hook on this rank's student output layer: its input (so the logits) x ``scale`` while
    ``when(step)`` holds. On the input, so it also reaches the fused output layer, which forms no logits."""
    def hook(module, args):
        return (args[0] * scale,) + tuple(args[1:]) if when(eng.trainer.step) else None

    return eng.trainer.stage.student.output_layer.register_forward_pre_hook(hook)


def _record_steps(eng) -> list:
    """Every StepResult of ``eng.train``, through the loop's callback protocol."""
    from distill_plugins.engine.callbacks import Callback

    results = []

    class Recorder(Callback):
        def on_step_end(self, engine, result):
            results.append(result)

    eng.add_callback(Recorder())
    return results


def _engine(tp: int, pp: int, *, steps: int, out: str, **kw):
    from distill_plugins.manager import build_plugin_host
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.run import Engine
    from distill_plugins.data.synthetic import SyntheticBatches

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        dps.destroy()
    recipe = _recipe(tp, pp, steps=steps, out=out, **kw)
    world = torch.distributed.get_world_size()
    dp_size, dp_rank = world // (tp * pp), None
    ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=True)
    dp_rank = ctx.dp_rank
    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=8,
                            dp_rank=dp_rank, dp_size=dp_size, seed=11)
    eng = Engine(recipe, build_plugin_host(), cpu=True, data=data)
    with torch.no_grad():  # the teacher is frozen and outside the optimizer: editing it after the build is exact
        _sharpen_teacher(eng.trainer.stage.teacher)
    return eng


def _parity_run(tp: int, pp: int, out: str) -> dict:
    eng = _engine(tp, pp, steps=PARITY_STEPS, out=out)
    results = [eng.trainer.train_step() for _ in range(PARITY_STEPS)]
    return {"loss": [r.metrics["loss"] for r in results], "grad_norm": [r.metrics["grad_norm"] for r in results]}


def four_rank_body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from distill_plugins.models.sources import assert_frozen, parameter_digest
    from distill_plugins.engine.trainer import NonFiniteLossError

    res: dict = {}
    # -- 1. TP=2 x PP=2: 30 steps, loss falls, teacher untouched -------------------
    eng = _engine(2, 2, steps=30, out=os.path.join(out, "tp2pp2"), lr=5e-3)
    stage = eng.trainer.stage
    teacher_before = parameter_digest(stage.teacher)
    student_names = set(stage.state_dict().keys())
    opt_params = sum(p.numel() for g in eng.trainer.optimizer.param_groups for p in g["params"])
    losses = [eng.trainer.train_step().metrics["loss"] for _ in range(30)]
    assert_frozen(stage.teacher)
    res["train"] = {
        "losses": losses,
        "teacher_same": parameter_digest(stage.teacher) == teacher_before,
        "teacher_in_state": any("teacher" in k for k in student_names),
        "opt_params": opt_params,
        "student_params": sum(p.numel() for p in stage.student.parameters()),
        "last_stage": stage.last_stage,
    }
    # -- 2. parity layouts (TP x PP x DP on 4 ranks) -------------------------------
    res["parity"] = {}
    for tp, pp in ((2, 2), (2, 1), (1, 2), (1, 1)):
        res["parity"][f"tp{tp}pp{pp}dp{4 // (tp * pp)}"] = _parity_run(tp, pp, os.path.join(out, f"p{tp}{pp}"))
    # -- 3. NaN logits on one rank: every rank skips -------------------------------
    eng = _engine(2, 2, steps=4, out=os.path.join(out, "nan"))
    if rank == world - 1:  # one TP rank of the last stage only, during the second step
        _poison_logits(eng, lambda step: step == 1)
    results = _record_steps(eng)
    eng.train()
    res["nan"] = {"skipped": [r.skipped for r in results], "skips": eng.trainer.nonfinite_skips,
                  "losses": [r.metrics["loss"] for r in results]}
    # -- 4. consecutive non-finite steps stop the run ------------------------------
    eng = _engine(2, 2, steps=6, out=os.path.join(out, "nan2"), max_nonfinite=2)
    if rank == world - 1:
        _poison_logits(eng, lambda step: True)
    try:
        eng.train()
        res["stop"] = None
    except NonFiniteLossError as exc:
        res["stop"] = (eng.trainer.step, str(exc))
    return res


def one_rank_body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    return _parity_run(1, 1, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("engine"))
    four = run_distributed(four_rank_body, 4, args=(out,))
    ref = run_distributed(one_rank_body, 1, args=(os.path.join(out, "ref"),))[0]
    return {"four": four, "ref": ref, "out": out}


def test_tp2_pp2_loss_falls_and_teacher_frozen(runs):
    for r in runs["four"]:
        t = r["train"]
        assert t["teacher_same"], "teacher parameters changed during training"
        assert not t["teacher_in_state"]
        assert t["opt_params"] == t["student_params"], "optimizer holds non-student parameters"
    losses = runs["four"][0]["train"]["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5, losses
    # every rank reports the same (broadcast) losses
    assert all(r["train"]["losses"] == losses for r in runs["four"])


@pytest.mark.parametrize("layout", ["tp2pp2dp1", "tp2pp1dp2", "tp1pp2dp2", "tp1pp1dp4"])
def test_parity_with_single_process(runs, layout):
    ref = runs["ref"]
    got = runs["four"][0]["parity"][layout]
    assert got["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-5)
    assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], rel=1e-5)
    for step in (1, 2):
        assert got["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-3)


def test_nan_on_one_rank_skips_everywhere(runs):
    for r in runs["four"]:
        assert r["nan"]["skipped"] == [False, True, False, False]
        assert r["nan"]["skips"] == 1
    lines = [json.loads(x) for x in open(os.path.join(runs["out"], "nan", "metrics.jsonl"))]
    assert [x["nonfinite_skips"] for x in lines] == [0.0, 1.0, 1.0, 1.0]
    assert lines[1]["skipped"] == 1.0


def test_consecutive_nonfinite_stops(runs):
    for r in runs["four"]:
        step, msg = r["stop"]
        assert step == 2
        assert "max_consecutive_nonfinite=2" in msg
