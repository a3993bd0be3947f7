"""bf16/fp16 training and the distributed optimizer through the engine on CPU (2 gloo ranks).

Precision (TP=2): one 2-process job trains the same tiny student from the same weights and
batches in fp32, bf16 and fp16. The reduced-precision runs must follow the
fp32 losses closely, keep their parameters in that dtype, and fp16 must run
megatron's dynamic loss scaler: an overflow (forced by huge logits on one
step) is skipped by the scaler and counted as ``loss_scale_skips``, not as a
non-finite step. (The losses are token sums, so the first scale is small: 64.)

Distributed optimizer (DP=2, optimizer state sharded over the two ranks): it
follows the plain optimizer, and 2 steps + checkpoint + resume + 2 steps equal
4 straight steps bit for bit, in fp32 and bf16 (where the fp32 main weights
live only in the optimizer's shards).
"""

from __future__ import annotations

import math

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB, SEQ, STEPS = 200, 16, 4


def _recipe(precision: str, out: str, *, tp: int = 2, distributed_optimizer: bool = False, resume: str = "none",
            fused="auto"):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, LossSpec, ModelSpec, ParallelSpec, Recipe,
                                               TrainingSpec)

    model = dict(arch="llama", num_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return Recipe(
        student=ModelSpec(hidden_size=32, **model), teacher=ModelSpec(hidden_size=48, **model),
        parallel=ParallelSpec(tensor=tp, make_vocab_size_divisible_by=8, distributed_optimizer=distributed_optimizer),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=STEPS, micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=0,
                              lr_decay="constant", precision=precision, initial_loss_scale=64.0),
        checkpoint=CheckpointSpec(resume=resume), loss=LossSpec(fused_output_layer=fused), device="cpu", seed=3,
        output_dir=out)


def _sharpen(model):
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)


def _engine(precision: str, out: str, **kw):
    from megatron.core import parallel_state as ps

    from distill_plugins.manager import build_plugin_host
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.run import Engine
    from distill_plugins.data.synthetic import SyntheticBatches

    if ps.model_parallel_is_initialized():
        dps.destroy()
    recipe = _recipe(precision, out, **kw)
    ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=True)
    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, seed=5,
                            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    eng = Engine(recipe, build_plugin_host(), cpu=True, data=data)
    _sharpen(eng.trainer.stage.teacher)  # frozen, outside the optimizer: editing it after the build is exact
    return eng


def _run(precision: str, out: str, hook=None) -> dict:
    # the hook scales the logits, so that run keeps them (the fused output layer forms none)
    eng = _engine(precision, out, **({"fused": False} if hook is not None else {}))
    if hook is not None:  # a torch forward hook on the student's output layer (logits, bias)
        eng.trainer.stage.student.output_layer.register_forward_hook(
            lambda module, args, output: (hook(eng.trainer.step, output[0]), output[1]))
    metrics = [eng.trainer.train_step().metrics for _ in range(STEPS)]
    return {"metrics": metrics, "dtype": str(next(eng.trainer.stage.student.parameters()).dtype)}


def _overflow_on_step_two(step, logits):
    return logits * 3e4 if step == 1 else logits


def worker(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    torch.set_num_threads(1)
    runs = {p: _run(p, f"{out}/{p}") for p in ("fp32", "bf16", "fp16")}
    runs["fp16_overflow"] = _run("fp16", f"{out}/overflow", hook=_overflow_on_step_two)
    runs["distopt"] = {p: _distributed_optimizer(p, f"{out}/distopt_{p}") for p in ("fp32", "bf16")}
    return runs


def _losses(engine, n):
    return [engine.trainer.train_step().metrics["loss"] for _ in range(n)]


def _distributed_optimizer(precision: str, out: str) -> dict:
    from distill_plugins.checkpoint.optimizer_state import is_distributed
    from distill_plugins.models.sources import parameter_digest

    plain = _losses(_engine(precision, f"{out}/plain", tp=1), STEPS)
    straight = _engine(precision, f"{out}/straight", tp=1, distributed_optimizer=True)
    sharded = is_distributed(straight.trainer.optimizer)
    losses = _losses(straight, STEPS)
    digest = parameter_digest(straight.trainer.stage.student)
    first = _engine(precision, f"{out}/resumed", tp=1, distributed_optimizer=True)
    resumed = _losses(first, STEPS // 2)
    first.save()
    second = _engine(precision, f"{out}/resumed", tp=1, distributed_optimizer=True, resume="auto")
    start = second.trainer.step
    resumed += _losses(second, STEPS - STEPS // 2)
    return {"plain": plain, "straight": losses, "resumed": resumed, "start": start, "sharded": sharded,
            "digests": (digest, parameter_digest(second.trainer.stage.student))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(worker, 2, args=(str(tmp_path_factory.mktemp("precision")),))[0]


@pytest.mark.parametrize("precision,dtype", [("bf16", "torch.bfloat16"), ("fp16", "torch.float16")])
def test_reduced_precision_follows_fp32(runs, precision, dtype):
    assert runs[precision]["dtype"] == dtype
    for ref, got in zip(runs["fp32"]["metrics"], runs[precision]["metrics"]):
        assert not got["skipped"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=0.05), (precision, ref["loss"], got["loss"])
        assert got["ce_loss"] == pytest.approx(ref["ce_loss"], rel=0.01)


def test_fp16_overflow_is_the_loss_scalers_skip(runs):
    metrics = runs["fp16_overflow"]["metrics"]
    assert runs["fp16"]["metrics"][-1]["loss_scale"] == 64.0
    assert runs["fp16"]["metrics"][-1]["loss_scale_skips"] == 0
    assert metrics[1]["loss_scale_skips"] == 1  # the huge-logit step overflowed in fp16 gradients
    assert metrics[-1]["nonfinite_skips"] == 0 and metrics[-1]["consecutive_nonfinite"] == 0
    assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distributed_optimizer_follows_and_resumes_exactly(runs, precision):
    r = runs["distopt"][precision]
    assert r["sharded"] is True
    assert r["straight"] == pytest.approx(r["plain"], rel=1e-4 if precision == "bf16" else 1e-6)
    assert r["start"] == STEPS // 2
    assert r["resumed"] == r["straight"]  # bit for bit
    assert r["digests"][0] == r["digests"][1]
