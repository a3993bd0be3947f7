"""Resume, checkpoint faults and SIGUSR1 through the engine (2 gloo ranks, TP=1 x PP=2).

One 2-process job, every run driven by the engine's loop (``Engine.train``) and
observed through its callback protocol:

* 10 steps straight; 5 steps + save + resume + 5 steps, bit for bit (stateful
  TAID objective and LATF selector); a half-written later checkpoint is skipped;
* a bit flipped in rank 1's file of the newest checkpoint: both ranks fall back
  to the older one, ``metrics.jsonl`` loses the replayed lines (kept in
  ``metrics.trimmed.jsonl``), and the corrupt checkpoint is moved aside, never
  overwritten;
* the only checkpoint corrupt: the run refuses to start on both ranks;
  ``resume: none`` starts beside it and keeps it;
* a bit flipped in ``model_dist/``: ``distill export`` refuses on both ranks;
* ``training.steps`` raised after a finished run: the LR schedule follows the new recipe;
* rank 1 cannot write (file-size limit): the save fails on both ranks with the
  documented error, no hang, the previous checkpoint intact;
* SIGUSR1 to one rank: both save and stop at the same step, the resumed run
  continues with the next one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB, SEQ = 200, 16
LR, WARMUP = 3e-3, 2


def _recipe(out: str, *, steps: int = 10, interval: int = 0, resume: str = "auto"):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, ModelSpec, ParallelSpec, PartSpec, Recipe,
                                               TrainingSpec)

    return Recipe(
        student=ModelSpec(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=32),
        teacher=ModelSpec(num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=32),
        parallel=ParallelSpec(tensor=1, pipeline=2, make_vocab_size_divisible_by=8),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=steps, micro_batch_size=2, global_batch_size=4, lr=LR, warmup_steps=WARMUP),
        checkpoint=CheckpointSpec(dir=os.path.join(out, "ckpt"), interval=interval, resume=resume, keep=5),
        objective=PartSpec(name="taid"), selector=PartSpec(name="latf"),
        device="cpu", seed=3, output_dir=out,
    )


def _engine(out: str, callbacks=(), **kw):
    from distill_plugins.data.synthetic import SyntheticBatches
    from distill_plugins.engine.run import Engine
    from distill_plugins.manager import build_plugin_host

    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, seed=5)
    return Engine(_recipe(out, **kw), build_plugin_host(), cpu=True, data=data, callbacks=callbacks)


def _snapshot(engine) -> dict:
    from distill_plugins.models.sources import parameter_digest

    tr = engine.trainer
    return {"step": tr.step, "digest": parameter_digest(tr.stage.student),
            "parts": {k: p.state_dict() for k, p in engine.parts.stateful().items()}}


def _recorder():
    from distill_plugins.engine.callbacks import Callback

    class Recorder(Callback):
        """Each step's metrics and each saved path, as the loop reports them."""

        def __init__(self):
            self.metrics, self.saved = [], []

        def on_step_end(self, engine, result):
            self.metrics.append(result.metrics)

        def on_save(self, engine, path):
            self.saved.append(path.name)

    return Recorder()


def _record(engine, steps=None):
    rec = _recorder()
    engine.add_callback(rec)
    engine.train(steps)
    return [m["loss"] for m in rec.metrics]


def _flip_byte(path: str, offset: int = -20) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _error(fn) -> str | None:
    from distill_plugins.errors import DistillError

    try:
        fn()
    except DistillError as exc:
        return str(exc)
    return None


def _metric_steps(out: str, name: str = "metrics.jsonl") -> list:
    path = os.path.join(out, name)
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from distill_plugins.checkpoint.run_checkpoint import find_latest_checkpoint, validate_checkpoint
    from distill_plugins.engine.callbacks import Callback
    from distill_plugins.models.hf_export import export_megatron_checkpoint

    res = {}
    # -- 10 steps straight ---------------------------------------------------------------------
    a = _engine(os.path.join(out, "a"))
    res["a_losses"] = _record(a, 10)
    res["a"] = _snapshot(a)
    # what `distill export` does: the run checkpoint, resharded to this group's layout, to a HF directory
    res["hf_dir"] = export_megatron_checkpoint(os.path.join(out, "a", "ckpt", "step_000010"),
                                               os.path.join(out, "a_hf"))

    # -- a bit flipped in model_dist/: export refuses on every rank ------------------------------
    flipped = os.path.join(out, "flipped", "step_000010")
    if rank == 0:
        shutil.copytree(os.path.join(out, "a", "ckpt", "step_000010"), flipped)
        shard = sorted(f for f in os.listdir(os.path.join(flipped, "model_dist")) if f.endswith(".distcp"))[0]
        _flip_byte(os.path.join(flipped, "model_dist", shard), offset=-200)
    torch.distributed.barrier()
    res["export_flipped"] = _error(lambda: export_megatron_checkpoint(flipped, os.path.join(out, "flipped_hf")))

    # -- 5 steps, save, resume, 5 steps --------------------------------------------------------------
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
    res["b_metric_steps"] = _metric_steps(b_out)

    # -- rank 1's file of step 10 corrupted (only rank 1 can tell): both fall back to step 5 ---------
    if rank == 1:
        _flip_byte(os.path.join(b_out, "ckpt", "step_000010", "rank_00001.pt"))
    torch.distributed.barrier()
    b3 = _engine(b_out)
    res["b3_start"] = b3.trainer.step
    rec = _recorder()
    b3.add_callback(rec)

    class MetricsAtStart(Callback):
        def on_train_start(self, engine):  # after the engine's MetricsLog trimmed the replayed lines
            torch.distributed.barrier()
            res["b3_metric_steps_at_start"] = _metric_steps(b_out)

    b3.add_callback(MetricsAtStart())
    b3.train(10)
    res["b3_losses"] = [m["loss"] for m in rec.metrics]
    res["b3_metric_steps"] = _metric_steps(b_out)
    res["b3_trimmed_steps"] = _metric_steps(b_out, "metrics.trimmed.jsonl")
    res["b3_ckpts"] = sorted(os.listdir(os.path.join(b_out, "ckpt")))
    aside = [d for d in res["b3_ckpts"] if d.startswith("step_000010.unloadable-")]
    res["b3_aside_problem"] = validate_checkpoint(os.path.join(b_out, "ckpt", aside[0]), deep=True) if aside else None
    res["b3_new10"] = validate_checkpoint(os.path.join(b_out, "ckpt", "step_000010"), deep=True)

    # -- the only checkpoint corrupt: refuse to start; resume: none starts beside it and keeps it ----
    e_out = os.path.join(out, "e")
    _record(_engine(e_out, steps=3))
    if rank == 0:
        _flip_byte(os.path.join(e_out, "ckpt", "step_000003", "rank_00000.pt"))
    torch.distributed.barrier()
    res["e_refused"] = _error(lambda: _engine(e_out, steps=3))
    e2 = _engine(e_out, steps=3, resume="none")
    res["e2_start"] = e2.trainer.step
    _record(e2)
    res["e_ckpts"] = sorted(os.listdir(os.path.join(e_out, "ckpt")))

    # -- training.steps raised after a finished run: the schedule follows the new recipe -------------
    d_out = os.path.join(out, "d")
    _record(_engine(d_out, steps=3), 3)
    d2 = _engine(d_out, steps=6)
    res["d2_start"] = d2.trainer.step
    rec = _recorder()
    d2.add_callback(rec)
    d2.train()
    res["d2_lr"] = [m["lr"] for m in rec.metrics]

    # -- rank 1 cannot write at step 4 (file-size limit): every rank gets the error, no hang --------
    f_out = os.path.join(out, "f")

    class LimitFileSize(Callback):
        """After the step-2 save, this rank may write files of at most 64 KiB (``ulimit -f``)."""

        def on_save(self, engine, path):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    f = _engine(f_out, steps=4, interval=2, callbacks=[LimitFileSize()] if rank == 1 else [])
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    try:
        res["f_error"] = _error(f.train)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    torch.distributed.barrier()
    res["f_latest"] = str(find_latest_checkpoint(os.path.join(f_out, "ckpt")))
    res["f_dirs"] = sorted(os.listdir(os.path.join(f_out, "ckpt")))
    res["f_step2_ok"] = validate_checkpoint(os.path.join(f_out, "ckpt", "step_000002"), deep=True)

    # -- SIGUSR1 to rank 1 after step 3: both ranks save step 3 and stop ---------------------------
    c_out = os.path.join(out, "c")

    class SignalAtStep3(Callback):
        def on_step_end(self, engine, result):
            if result.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    c = _engine(c_out, callbacks=[SignalAtStep3()] if rank == 1 else [])
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
    assert results[0]["b_metric_steps"] == list(range(1, 11))


def test_interrupted_save_is_skipped(results):
    for r in results:
        assert r["latest"].endswith("step_000005")


def test_corrupt_rank_file_falls_back_on_every_rank(results):
    """Only rank 1 reads the flipped byte; both ranks resume from step 5 and replay 6..10 exactly."""
    for r in results:
        assert r["b3_start"] == 5
        assert r["b3_losses"] == r["a_losses"][5:]
        aside = [d for d in r["b3_ckpts"] if d.startswith("step_000010.unloadable-")]
        assert len(aside) == 1, r["b3_ckpts"]  # the corrupt checkpoint was kept, not overwritten
        assert "checksum mismatch" in r["b3_aside_problem"]
        assert r["b3_new10"] is None


def test_replayed_metrics_lines_are_trimmed(results):
    r = results[0]
    assert r["b3_metric_steps_at_start"] == [1, 2, 3, 4, 5]
    assert r["b3_metric_steps"] == list(range(1, 11))  # one line per step after the replay
    assert r["b3_trimmed_steps"] == [6, 7, 8, 9, 10]


def test_unloadable_only_checkpoint_refuses_to_start(results):
    for r in results:
        msg = r["e_refused"]
        assert msg is not None and "none can be loaded" in msg and "step_000003" in msg
        assert "rank_00000.pt checksum mismatch" in msg and "checkpoint.resume: none" in msg
        assert r["e2_start"] == 0
        kept = [d for d in r["e_ckpts"] if d.startswith("step_000003.unloadable-")]
        assert len(kept) == 1 and "step_000003" in r["e_ckpts"], r["e_ckpts"]


def test_export_refuses_a_corrupt_model_dist(results):
    for r in results:
        assert r["export_flipped"] is not None
        assert "checksum mismatch" in r["export_flipped"] and "model_dist/" in r["export_flipped"]


def test_longer_training_steps_rebase_the_schedule(results):
    """Resumed at step 3 with training.steps 3 -> 6: steps 4..6 follow a 6-step warm-up + cosine schedule."""
    def lr(step, total=6):
        ratio = (step - WARMUP) / (total - WARMUP)
        return LR * 0.5 * (1 + math.cos(math.pi * ratio))

    for r in results:
        assert r["d2_start"] == 3
        assert r["d2_lr"] == pytest.approx([lr(4), lr(5), lr(6)], abs=1e-12)
        assert r["d2_lr"][0] > 1e-3  # the old schedule had decayed to 0 at step 3


def test_save_failing_on_one_rank_fails_on_every_rank(results):
    for r in results:
        msg = r["f_error"]
        assert msg is not None, "the save at step 4 should have failed"
        assert "step_000004 was not saved" in msg and "the previous checkpoint is intact" in msg
        assert "rank 1" in msg and "File too large" in msg and "ulimit -f" in msg
        assert r["f_latest"].endswith("step_000002") and r["f_step2_ok"] is None
        assert [d for d in r["f_dirs"] if d.startswith("step_")] == ["step_000002"], r["f_dirs"]


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
