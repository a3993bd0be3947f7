"""Cross-entropy under loss-computing aligners (issue 17 item 17), in one process.

* the CE term is normalised by the student's valid tokens, not by the aligned
  tokens the KD term is divided by (before: ``ce_weight`` acted ~valid/aligned
  times too strongly, ~2.4x for eta/dskd);
* a CE-only run (``kd_weight: 0``) of a cross-tokenizer recipe trains on the
  aligner's raw-text batches (the same tokens as the aligner run), not on
  token-id batches.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distill_plugins import build_plugin_host
from distill_plugins.aligners import ETAAligner, VocabMap
from distill_plugins.engine.alignment import CE_ALIGNED_KEY, AlignerRuntime
from distill_plugins.engine.loss import LossParts
from distill_plugins.recipe.schema import DataSpec, LossSpec, ModelSpec, PartSpec, Recipe, TrainingSpec
from test_aligners import docstrings, train_bpe

HOST = build_plugin_host(entry_points=False)
VS, VT, B, S = 12, 10, 2, 6


def _microbatch(seed: int, aligned_per_row: int):
    """A text-path microbatch: student labels everywhere but the last position, ``aligned_per_row`` pairs per row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VS, (B, S), generator=g)
    labels[:, -1] = -100
    pos = torch.full((B, S), -1, dtype=torch.long)
    pos[:, :aligned_per_row] = torch.arange(aligned_per_row)
    batch = {"labels": labels, "loss_mask": (labels != -100).float(), "align_teacher_pos": pos,
             "aligned_mask": pos >= 0, "teacher_tokens": torch.zeros(B, S, dtype=torch.long)}
    out = SimpleNamespace(student_logits=torch.randn(B, S, VS, generator=g).requires_grad_(True),
                          teacher_logits=torch.randn(B, S, VT, generator=g), student_hidden=None, teacher_hidden=None)
    return batch, out


def _runtime(kd: float, ce: float) -> tuple[AlignerRuntime, LossParts]:
    eta = ETAAligner()
    eta.setup(vocab_map=VocabMap(torch.arange(VT), torch.arange(VT), VS, VT), objective=HOST.build("objective",
                                                                                                     "forward_kl"))
    rt = AlignerRuntime(eta, "eta", student_vocab_size=VS, teacher_vocab_size=VT, text_batches=True, kd_weight=kd,
                        ce_weight=ce)
    return rt, LossParts(objective=eta.objective, kd_weight=kd, ce_weight=ce)


def _ce_sum(batch, out) -> float:
    valid = batch["labels"] != -100
    return float(F.cross_entropy(out.student_logits.detach()[valid], batch["labels"][valid], reduction="sum"))


@pytest.mark.parametrize("coverage", [(2, 2), (1, 4)], ids=["even", "uneven"])
def test_ce_is_normalised_by_the_students_valid_tokens(coverage):
    kd_w, ce_w = 1.0, 0.5
    rt, parts = _runtime(kd_w, ce_w)
    results, kd_only = [], []
    for seed, aligned in enumerate(coverage):
        batch, out = _microbatch(seed, aligned)
        loss, count, report = rt.loss(batch, out, parts, tp_group=None, step=0, total_steps=1)
        kd_loss, kd_count, _ = _runtime(kd_w, 0.0)[0].loss(batch, out, dataclasses.replace(parts, ce_weight=0.0),
                                                           tp_group=None, step=0, total_steps=1)
        n_valid = int((batch["labels"] != -100).sum())
        assert int(count) == int(kd_count) == B * aligned  # the KD normaliser: aligned tokens
        ce_mean = _ce_sum(batch, out) / n_valid
        # this microbatch's CE enters as aligned * CE_mean: after the step divides by the aligned total,
        # the CE term carries weight ce_weight (before: ce_sum / aligned, i.e. valid/aligned times too much)
        assert float(loss.detach()) == pytest.approx(float(kd_loss.detach()) + ce_w * int(count) * ce_mean, rel=1e-6)
        assert float(report[CE_ALIGNED_KEY]) == pytest.approx(int(count) * ce_mean, rel=1e-6)
        results.append((float(loss.detach()), int(count), ce_mean, n_valid, report))
        kd_only.append(float(kd_loss.detach()))
    step_loss = sum(r[0] for r in results) / sum(r[1] for r in results)
    kd_mean = sum(kd_only) / sum(r[1] for r in results)
    weighted_ce = sum(r[1] * r[2] for r in results) / sum(r[1] for r in results)
    assert step_loss == pytest.approx(kd_w * kd_mean + ce_w * weighted_ce, rel=1e-6)
    token_mean_ce = sum(r[2] * r[3] for r in results) / sum(r[3] for r in results)
    if coverage[0] == coverage[1]:  # the same coverage in every microbatch: exactly the CE token mean
        assert step_loss == pytest.approx(kd_w * kd_mean + ce_w * token_mean_ce, rel=1e-6)
    # the logged loss is the objective the step optimises
    sums = {k: sum(float(r[4][k]) for r in results) for k in results[0][4]}
    assert rt.metrics(sums)["loss"] == pytest.approx(step_loss, rel=1e-6)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ce_only")
    texts = docstrings()[:60]
    for size in (300, 500):
        train_bpe(size, texts).save(str(root / f"bpe{size}.json"))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return root


def _recipe(root, *, kd: float, teacher_tok: bool, aligner: str = "auto") -> Recipe:
    model = ModelSpec(num_layers=1, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    return Recipe(student=model, teacher=model,
                  data=DataSpec(kind="jsonl", paths=[str(root / "corpus.jsonl")], tokenizer=str(root / "bpe300.json"),
                                teacher_tokenizer=str(root / "bpe500.json") if teacher_tok else None, seq_length=16),
                  training=TrainingSpec(steps=2, micro_batch_size=2, global_batch_size=4),
                  loss=LossSpec(kd_weight=kd, ce_weight=1.0), aligner=PartSpec(name=aligner), device="cpu")


def test_ce_only_run_uses_the_aligners_text_batches(tokenizers):
    vocab = dict(student_vocab_size=300, teacher_vocab_size=500)
    distil = AlignerRuntime.build(_recipe(tokenizers, kd=1.0, teacher_tok=True), HOST, **vocab)
    ce_only = AlignerRuntime.build(_recipe(tokenizers, kd=0.0, teacher_tok=True), HOST, **vocab)
    assert distil.text_batches and ce_only.text_batches  # the baseline reads the aligner run's batches
    assert ce_only.aligner is None and not ce_only.computes_loss  # ... but builds no aligner (and no teacher)
    one = dict(student_vocab_size=300, teacher_vocab_size=300)
    assert not AlignerRuntime.build(_recipe(tokenizers, kd=0.0, teacher_tok=False), HOST, **one).text_batches
    assert not AlignerRuntime.build(_recipe(tokenizers, kd=0.0, teacher_tok=True, aligner="identity"), HOST,
                                    **vocab).text_batches


def test_ce_only_cross_tokenizer_recipe_passes_check(tokenizers):
    from distill_plugins.recipe.schema import recipe_data
    from distill_plugins.recipe.validate import validate_recipe_data

    recipe, _ = validate_recipe_data(recipe_data(_recipe(tokenizers, kd=0.0, teacher_tok=True, aligner="eta")), HOST)
    assert recipe.loss.kd_weight == 0 and recipe.aligner.name == "eta"


def _ce_only_body(rank, world, root):
    """Two optimizer steps of the CE-only cross-tokenizer recipe through the engine (one gloo process)."""
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.engine.run import Engine

    enable_cpu_mode()
    recipe = dataclasses.replace(_recipe(root, kd=0.0, teacher_tok=True, aligner="eta"), output_dir=str(root / "run"))
    engine = Engine(recipe, build_plugin_host(entry_points=False), cpu=True)
    metrics = [engine.trainer.train_step().metrics for _ in range(2)]
    return {"stream": engine.data.state_dict()["stream"], "teacher": engine.trainer.stage.teacher is not None,
            "ce": [m["ce_loss"] for m in metrics], "loss": [m["loss"] for m in metrics]}


def test_ce_only_run_trains_on_text_batches_end_to_end(tokenizers):
    from distill_plugins.testing.distributed import run_distributed

    (res,) = run_distributed(_ce_only_body, 1, args=(tokenizers,), timeout=300)
    assert res["stream"] == "text" and res["teacher"] is False
    assert all(x > 0 for x in res["ce"]) and res["loss"] == res["ce"]  # CE only: the loss is the CE token mean
