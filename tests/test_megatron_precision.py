"""bf16 and fp16 training through the engine on CPU (2 gloo ranks, TP=2).

One 2-process job trains the same tiny student from the same weights and
batches in fp32, bf16 and fp16. The reduced-precision runs must follow the
fp32 losses closely, keep their parameters in that dtype, and fp16 must run
megatron's dynamic loss scaler: an overflow (forced by huge logits on one
step) is skipped by the scaler and counted as ``loss_scale_skips``, not as a
non-finite step.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB, SEQ, STEPS = 200, 16, 4


def _recipe(precision: str, out: str):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, ModelSpec, ParallelSpec, Recipe,
                                               TrainingSpec)

    model = dict(arch="llama", num_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return Recipe(
        student=ModelSpec(hidden_size=32, **model), teacher=ModelSpec(hidden_size=48, **model),
        parallel=ParallelSpec(tensor=2, make_vocab_size_divisible_by=8),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=STEPS, micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=0,
                              lr_decay="constant", precision=precision, initial_loss_scale=64.0),
        checkpoint=CheckpointSpec(resume="none"), device="cpu", seed=3, output_dir=out)


def _sharpen(model):
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)


def _run(precision: str, out: str, hook=None) -> dict:
    from megatron.core import parallel_state as ps

    from distill_plugins.manager import build_plugin_host
    from distill_plugins.megatron import parallel_state as dps
    from distill_plugins.megatron.engine import Engine
    from distill_plugins.megatron.synthetic import SyntheticBatches

    if ps.model_parallel_is_initialized():
        dps.destroy()
    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, seed=5)
    eng = Engine(_recipe(precision, out), build_plugin_host(), cpu=True, data=data, teacher_init=_sharpen)
    eng.trainer.logits_hook = hook
    metrics = [eng.trainer.train_step().metrics for _ in range(STEPS)]
    return {"metrics": metrics, "dtype": str(next(eng.trainer.stage.student.parameters()).dtype)}


def _overflow_on_step_two(step, logits):
    return logits * 3e4 if step == 1 else logits


def worker(rank: int, world: int, out: str) -> dict:
    from distill_plugins.megatron.cpu import enable_cpu_mode

    enable_cpu_mode()
    torch.set_num_threads(1)
    runs = {p: _run(p, f"{out}/{p}") for p in ("fp32", "bf16", "fp16")}
    runs["fp16_overflow"] = _run("fp16", f"{out}/overflow", hook=_overflow_on_step_two)
    return runs


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
