"""Vocabulary aligners through the megatron engine (2 gloo ranks, CPU).

One 2-process job runs every check:

* a teacher is trained with cross-entropy on its own tokenizer (500 tokens,
  DP=2), saved, and loaded back as the frozen teacher (TP=2) of a student with
  another tokenizer (300 tokens): ``eta`` (exact token alignment), no
  cross-entropy on labels. The student's held-out cross-entropy (on its own
  tokenization) must fall;
* the same DSKD step under TP=2, DP=2 and PP=2 gives the same loss and
  gradient norm (projectors in DDP, the optimizer and clipping);
* 2 + 2 steps with a checkpoint in between equal 4 straight steps (projector
  weights included);
* ``uld`` runs and reports coverage; DSKD logs its three terms;
* DSKD with one tokenizer runs on the usual token batches (no text path);
* a CE-only run builds no teacher (PP=2: the pipeline carries the student alone);
* AdaSPEC's reference model runs beside the teacher (PP=2): a reference equal
  to the student makes every loss gap 0, so every token is kept (ties); a
  different one keeps the configured fraction.

Two tiny byte-level BPEs are trained in the test on stdlib docstrings.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed
from test_aligners import HELD_OUT_MODULES, docstrings, train_bpe

SEQ = 32
TRAIN_MODULES = ("textwrap.py", "json/__init__.py", "json/decoder.py", "argparse.py", "string.py", "shlex.py",
                 "fractions.py", "heapq.py", "bisect.py", "difflib.py", "statistics.py", "pathlib.py",
                 "ipaddress.py", "datetime.py", "inspect.py", "subprocess.py", "tarfile.py", "typing.py")
TEACHER_STEPS, DISTILL_STEPS = 150, 40


def _recipe(root: str, name: str, *, student_tok: str, teacher_tok=None, aligner="dskd", student_width=32,
            teacher_width=64, tp=1, pp=1, steps=DISTILL_STEPS, kd=1.0, ce=0.0, teacher_ckpt=None, lr=3e-3,
            aligner_params=None, resume="none", objective="forward_kl", selector=None, student_ckpt=None,
            reference_ckpt=None):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, LossSpec, ModelSpec, ParallelSpec, PartSpec,
                                               Recipe, TrainingSpec)

    def model(width, layers):
        return ModelSpec(arch="llama", num_layers=layers, hidden_size=width, num_attention_heads=4,
                         max_position_embeddings=SEQ)

    out = os.path.join(root, name)
    reference = None
    if selector is not None:
        reference = dataclass_replace(model(student_width, 2), checkpoint=reference_ckpt)
    return Recipe(
        student=dataclass_replace(model(student_width, 2), checkpoint=student_ckpt),
        reference=reference,
        selector=PartSpec(name=selector["name"], params={k: v for k, v in selector.items() if k != "name"})
        if selector else PartSpec(name="all"),
        teacher=dataclass_replace(model(teacher_width, 2), checkpoint=teacher_ckpt),
        parallel=ParallelSpec(tensor=tp, pipeline=pp, make_vocab_size_divisible_by=8),
        data=DataSpec(kind="jsonl", paths=[os.path.join(root, "corpus.jsonl")], tokenizer=student_tok,
                      teacher_tokenizer=teacher_tok, seq_length=SEQ, split="90,10,0"),
        training=TrainingSpec(steps=steps, micro_batch_size=4, global_batch_size=8, lr=lr, warmup_steps=0,
                              lr_decay="constant", clip_grad=1.0, eval_batches=4),
        checkpoint=CheckpointSpec(dir=os.path.join(out, "ckpt"), interval=0, resume=resume, keep=3),
        loss=LossSpec(kd_weight=kd, ce_weight=ce),
        objective=PartSpec(name=objective),
        aligner=PartSpec(name=aligner, params=aligner_params or {}),
        device="cpu", seed=5, output_dir=out,
    )


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _engine(recipe):
    from megatron.core import parallel_state as ps

    from distill_plugins.manager import build_plugin_host
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.run import Engine
    from distill_plugins.recipe.schema import recipe_data
    from distill_plugins.recipe.validate import validate_recipe_data

    if ps.model_parallel_is_initialized():
        dps.destroy()
    host = build_plugin_host()
    validate_recipe_data(recipe_data(recipe), host)  # raises on errors, as `distill run` does
    return Engine(recipe, host, cpu=True)


def _held_out_ce(engine) -> float:
    return engine.trainer.evaluate(engine._build_data(split="valid", eval=True))["eval_ce_loss"]


def _projectors(engine):
    mods = engine.aligner.state_dict().get("modules", [])
    return [{k: v.clone() for k, v in m.items()} for m in mods]


def _steps(engine, n):
    return [engine.trainer.train_step().metrics for _ in range(n)]


def worker(rank: int, world: int, root: str, s_tok: str, t_tok: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    torch.set_num_threads(1)
    res: dict = {}

    # 1. teacher: cross-entropy on its own tokenizer (DP=2), with a placeholder teacher
    eng = _engine(_recipe(root, "teacher", student_tok=t_tok, aligner="identity", student_width=64,
                          teacher_width=16, steps=TEACHER_STEPS, kd=0.0, ce=1.0, lr=1e-2))
    res["ce_only_has_teacher"] = eng.trainer.stage.teacher is not None
    res["teacher_ce"] = (_held_out_ce(eng), None)
    eng.train()
    res["teacher_ce"] = (res["teacher_ce"][0], _held_out_ce(eng))
    teacher_ckpt = os.path.join(root, "teacher", "ckpt", f"step_{TEACHER_STEPS:06d}")

    # 2. cross-tokenizer ETA, TP=2: the student's held-out CE falls
    eng = _engine(_recipe(root, "eta", student_tok=s_tok, teacher_tok=t_tok, tp=2, teacher_ckpt=teacher_ckpt,
                          aligner="eta"))
    res["text_batches"] = eng.aligner.text_batches
    before = _held_out_ce(eng)
    metrics = _steps(eng, DISTILL_STEPS)
    res["student_ce"] = (before, _held_out_ce(eng))
    res["eta_metrics"] = metrics[-1]
    res["teacher_vocab"] = (eng.vocab_size, eng.teacher_vocab_size)

    # 3. one DSKD layout against another: TP=2, DP=2, PP=2 on the same first steps
    parity = {}
    for name, tp, pp in (("tp2", 2, 1), ("dp2", 1, 1), ("pp2", 1, 2)):
        eng = _engine(_recipe(root, f"parity_{name}", student_tok=s_tok, teacher_tok=t_tok, tp=tp, pp=pp,
                              teacher_ckpt=teacher_ckpt, steps=3))
        metrics = _steps(eng, 3)
        parity[name] = [(m["loss"], m["grad_norm"]) for m in metrics]
    res["parity"] = parity
    res["dskd_metrics"] = metrics[-1]

    # 4. resume: 2 + 2 steps == 4 steps, projectors included (TP=2)
    straight = _engine(_recipe(root, "straight", student_tok=s_tok, teacher_tok=t_tok, tp=2,
                               teacher_ckpt=teacher_ckpt, steps=4))
    res["straight"] = [m["loss"] for m in _steps(straight, 4)]
    res["straight_proj"] = _projectors(straight)
    first = _engine(_recipe(root, "resumed", student_tok=s_tok, teacher_tok=t_tok, tp=2, teacher_ckpt=teacher_ckpt,
                            steps=4))
    losses = [m["loss"] for m in _steps(first, 2)]
    first.save()
    second = _engine(_recipe(root, "resumed", student_tok=s_tok, teacher_tok=t_tok, tp=2, teacher_ckpt=teacher_ckpt,
                             steps=4, resume="auto"))
    res["resumed_from"] = second.trainer.step
    res["resumed"] = losses + [m["loss"] for m in _steps(second, 2)]
    res["resumed_proj"] = _projectors(second)

    # 5. CE only (no teacher built) under PP=2: the pipeline carries the student's hidden states alone
    eng = _engine(_recipe(root, "ce_pp2", student_tok=s_tok, teacher_tok=t_tok, pp=2, kd=0.0, ce=1.0, steps=3))
    res["ce_pp2"] = ([m["ce_loss"] for m in _steps(eng, 3)], eng.trainer.stage.hidden_size, eng.aligner.text_batches)
    student_ckpt = str(eng.save())

    # 6. AdaSPEC: the reference model rides the pipeline (PP=2) beside a (random) teacher on the student's tokens
    adaspec = {"name": "adaspec", "fraction": 0.4}
    for name, ref in (("same", student_ckpt), ("other", None)):
        eng = _engine(_recipe(root, f"adaspec_{name}", student_tok=s_tok, aligner="identity", pp=2, steps=2,
                              selector=adaspec, student_ckpt=student_ckpt, reference_ckpt=ref))
        res[f"adaspec_{name}"] = (_steps(eng, 1)[0], eng.trainer.stage.hidden_size)

    # 7. uld runs on the text path; dskd on one tokenizer takes token batches
    eng = _engine(_recipe(root, "uld", student_tok=s_tok, teacher_tok=t_tok, aligner="uld", tp=2,
                          teacher_ckpt=teacher_ckpt, steps=2))
    res["uld"] = _steps(eng, 2)[-1]
    eng = _engine(_recipe(root, "dskd_one_tok", student_tok=t_tok, aligner="dskd", tp=2, teacher_ckpt=teacher_ckpt,
                          student_width=32, steps=2))
    res["one_tok_text_batches"] = eng.aligner.text_batches
    res["one_tok"] = _steps(eng, 2)[-1]
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_aligners")
    texts = docstrings(TRAIN_MODULES) + docstrings(HELD_OUT_MODULES)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    paths = []
    for size in (300, 500):
        path = root / f"bpe{size}.json"
        train_bpe(size, docstrings(TRAIN_MODULES)).save(str(path))
        paths.append(str(path))
    return run_distributed(worker, 2, args=(str(root), paths[0], paths[1]), timeout=900)[0]


def test_teacher_learned_and_student_distils_across_tokenizers(run):
    t_before, t_after = run["teacher_ce"]
    assert t_after < t_before - 1.0, run["teacher_ce"]
    assert run["text_batches"] is True
    assert run["teacher_vocab"] == (300, 500)
    s_before, s_after = run["student_ce"]
    # the student never sees its labels: only the teacher (through the aligned pairs) teaches it
    assert s_after < s_before - 0.5, run["student_ce"]
    m = run["eta_metrics"]
    assert 0.2 < m["aligned_fraction"] < 1.0, m  # two BPEs of different sizes: many positions do not pair
    assert m["kept_tokens"] < m["valid_tokens"]


def test_dskd_logs_its_terms(run):
    m = run["dskd_metrics"]
    assert 0.2 < m["aligned_fraction"] < 1.0, m
    for term in ("aligner/t2s_ce", "aligner/t2s_kd", "aligner/s2t_kd"):
        assert math.isfinite(m[term]) and m[term] >= 0, m
    assert m["aligner/t2s_ce"] > 0


def test_ce_only_runs_build_no_teacher(run):
    assert run["ce_only_has_teacher"] is False
    losses, width, text = run["ce_pp2"]
    assert width == 32 and text is True  # student hidden only; the raw-text batches the dskd run reads
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_adaspec_reads_the_reference_model(run):
    same, width = run["adaspec_same"]
    assert width == 32 + 64 + 32  # student + teacher + reference hidden states between the stages
    assert same["kept_fraction"] == 1.0  # reference == student: every gap is 0, all tied at the threshold
    other, _ = run["adaspec_other"]
    assert 0.35 < other["kept_fraction"] < 0.45, other  # the top 40% of gaps (an interpolated quantile)
    assert math.isfinite(other["loss"]) and other["loss"] > 0


def test_dskd_layouts_agree(run):
    ref = run["parity"]["dp2"]
    for name in ("tp2", "pp2"):
        for (loss, gnorm), (rloss, rgnorm) in zip(run["parity"][name], ref):
            assert loss == pytest.approx(rloss, rel=1e-4, abs=1e-5), (name, run["parity"])
            assert gnorm == pytest.approx(rgnorm, rel=1e-3, abs=1e-5), (name, run["parity"])


def test_resume_restores_projectors_exactly(run):
    assert run["resumed_from"] == 2
    assert run["resumed"] == run["straight"]
    assert len(run["straight_proj"]) == 1
    for a, b in zip(run["straight_proj"], run["resumed_proj"]):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_uld_reports_coverage(run):
    m = run["uld"]
    assert math.isfinite(m["loss"]) and m["loss"] > 0, m
    assert 0.0 < m["aligned_fraction"] <= 1.0, m


def test_dskd_with_one_tokenizer_uses_token_batches(run):
    assert run["one_tok_text_batches"] is False
    assert run["one_tok"]["aligned_fraction"] == 1.0
    assert math.isfinite(run["one_tok"]["loss"])
