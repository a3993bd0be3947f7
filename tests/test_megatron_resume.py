"""Exact resume, interrupted saves and SIGUSR1 through the engine (2 gloo ranks, TP=1 x PP=2).

One 2-process job: 10 steps straight; 5 steps + save + resume + 5 steps (bit for
bit, with stateful TAID objective and LATF selector); a half-written later
checkpoint is skipped; SIGUSR1 to one rank makes both save and stop at the same
step, and the resumed run continues with the next one.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB, SEQ = 200, 16


def _recipe(out: str, *, steps: int = 10, interval: int = 0):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, ModelSpec, ParallelSpec, PartSpec, Recipe,
                                               TrainingSpec)

    return Recipe(
        student=ModelSpec(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=32),
        teacher=ModelSpec(num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=32),
        parallel=ParallelSpec(tensor=1, pipeline=2, make_vocab_size_divisible_by=8),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=steps, micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=2),
        checkpoint=CheckpointSpec(dir=os.path.join(out, "ckpt"), interval=interval, resume="auto", keep=5),
        objective=PartSpec(name="taid"), selector=PartSpec(name="latf"),
        device="cpu", seed=3, output_dir=out,
    )


def _engine(out: str, **kw):
    from distill_plugins.manager import build_plugin_host
    from distill_plugins.engine.run import Engine
    from distill_plugins.data.synthetic import SyntheticBatches

    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, seed=5)
    return Engine(_recipe(out, **kw), build_plugin_host(), cpu=True, data=data)


def _snapshot(engine) -> dict:
    from distill_plugins.models.sources import parameter_digest

    tr = engine.trainer
    return {"step": tr.step, "digest": parameter_digest(tr.stage.student),
            "parts": {k: p.state_dict() for k, p in engine.parts.stateful().items()}}


def _record(engine, steps):
    losses = []
    engine.trainer.step_callbacks.append(lambda tr, res: losses.append(res.metrics["loss"]))
    engine.train(steps)
    return losses


def body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from distill_plugins.checkpoint.run_checkpoint import find_latest_checkpoint

    res = {}
    # 10 steps straight
    a = _engine(os.path.join(out, "a"))
    res["a_losses"] = _record(a, 10)
    res["a"] = _snapshot(a)
    # what `distill export` does: the run checkpoint, resharded to this group's layout, to a HF directory
    from distill_plugins.models.hf_export import export_megatron_checkpoint

    res["hf_dir"] = export_megatron_checkpoint(os.path.join(out, "a", "ckpt", "step_000010"),
                                               os.path.join(out, "a_hf"))
    # 5 steps, save, resume, 5 steps
    b_out = os.path.join(out, "b")
    b = _engine(b_out)
    res["b1_losses"] = _record(b, 5)
    # an interrupted later save must be ignored
    if rank == 0:
        junk = os.path.join(b_out, "ckpt", "step_000007.tmp-deadbeef")
        os.makedirs(junk)
        with open(os.path.join(junk, "rank_00000.pt.partial"), "wb") as f:
            f.write(b"\0" * 100)
    torch.distributed.barrier()
    res["latest"] = str(find_latest_checkpoint(os.path.join(b_out, "ckpt")))
    b2 = _engine(b_out)
    res["b2_start"] = b2.trainer.step
    res["b2_losses"] = _record(b2, 10)
    res["b"] = _snapshot(b2)
    # SIGUSR1 to rank 1 after step 3: both ranks save step 3 and stop
    c_out = os.path.join(out, "c")
    c = _engine(c_out)
    if rank == 1:
        c.trainer.step_callbacks.append(
            lambda tr, r: os.kill(os.getpid(), signal.SIGUSR1) if tr.step == 3 else None)
    res["c_rc"] = c.train()
    res["c_stopped_at"] = c.trainer.step
    torch.distributed.barrier()
    marker = os.path.join(c_out, "REQUEUE")
    res["marker"] = open(marker).read() if os.path.exists(marker) else None
    res["a_marker"] = os.path.exists(os.path.join(out, "a", "REQUEUE"))
    c2 = _engine(c_out)
    res["c2_start"] = c2.trainer.step
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(body, 2, args=(str(tmp_path_factory.mktemp("resume")),))


def test_resume_is_bit_exact(results):
    for r in results:
        assert r["b2_start"] == 5
        assert r["b1_losses"] + r["b2_losses"] == r["a_losses"]
        assert r["b"]["digest"] == r["a"]["digest"]
        assert r["b"]["parts"] == r["a"]["parts"]
        assert r["a"]["parts"], "TAID/LATF state should be non-empty"


def test_interrupted_save_is_skipped(results):
    for r in results:
        assert r["latest"].endswith("step_000005")


def test_sigusr1_saves_and_stops_everywhere(results):
    for r in results:
        assert r["c_rc"] == 0
        assert r["c_stopped_at"] == 3
        assert r["c2_start"] == 3
        assert r["marker"] == "step=3\n"  # the job script requeues on this file (docs/launching.md)
        assert r["a_marker"] is False  # a run that finished asks for no requeue


def test_run_checkpoint_exports_to_transformers(results):
    """A run checkpoint (saved at PP=2) exports to a directory that transformers loads."""
    from transformers import AutoModelForCausalLM

    from distill_plugins.models.model_info import count_parameters
    from distill_plugins.recipe.schema import ModelSpec

    model = AutoModelForCausalLM.from_pretrained(results[0]["hf_dir"])
    spec = ModelSpec(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(spec, VOCAB)
    logits = model(torch.arange(8).unsqueeze(0) % VOCAB).logits
    assert logits.shape == (1, 8, VOCAB) and torch.isfinite(logits).all()
