"""Sequence sources inside the engine: on-policy / mixed / third-party sources on the tiny instruction task.

Two process groups for the whole module (worker bodies at module top: spawned
processes import this module):

* one process (TP=1 x PP=1): ``mixed`` with lambda 0 trains exactly like
  ``dataset``; lambda 1 trains on the student's own samples only (the batch's
  response tokens are what ``generate`` gives for the same per-row seeds, the
  prompt and padding carry no label); a third-party source registered through
  ``distill_register_sequence_sources`` (this module is the plugin) is built from
  the recipe and its plan is followed;
* four processes: the same seed gives the same generated tokens, sample by
  sample, under TP=1 (DP=4), TP=2 (DP=2), PP=2 (DP=2) and TP=2 x PP=2; and a
  ``mixed`` run (lambda 1 -> 0.5) resumed from its step-2 checkpoint (TP=2 x
  PP=2) reproduces step 3 of the uninterrupted run (loss, on-policy fraction,
  generated tokens) bit for bit.

The refusals (no prompts, no teacher, teacher on its own ranks) run in-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from distill_plugins import PartConfig, SamplingParams, SequencePlan, SequenceSource, hookimpl
from distill_plugins.errors import RecipeError
from distill_plugins.interfaces import FROM_DATASET, FROM_STUDENT, IGNORE_INDEX
from distill_plugins.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/on_policy_tp2_pp2.yaml"
NEW = 8  # max_new_tokens: short responses keep the module fast
BASE = ["training.global_batch_size=8", "training.micro_batch_size=2", "training.warmup_steps=0",
        "training.lr_decay=constant", "data.seq_length=64", "seed=5", "checkpoint.resume=none"]


# ---------------------------------------------------------------------------
# The third-party source (this module is the plugin a recipe names)
# ---------------------------------------------------------------------------


class EveryOther(SequenceSource):
    """Rows 0, 2, 4, ... sampled from the student (greedy), the others from the data."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        period: int = 2

    def plan(self, num_examples, *, step, total_steps, generator):
        origin = torch.where(torch.arange(num_examples) % self.config.period == 0, FROM_STUDENT, FROM_DATASET)
        return SequencePlan(origin=origin.long(), sampling=SamplingParams(temperature=0.0, max_new_tokens=5))


@hookimpl
def distill_register_sequence_sources(register):
    register("every_other_test", EveryOther)


# ---------------------------------------------------------------------------
# Rank bodies
# ---------------------------------------------------------------------------


def _engine(tp: int, pp: int, out: str, overrides: list[str], plugins: tuple[str, ...] = ()):
    from megatron.core import parallel_state as ps

    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.run import Engine
    from distill_plugins.recipe.load import load_recipe

    if ps.model_parallel_is_initialized():
        dps.destroy()
    extra = [f"plugins=[{', '.join(plugins)}]"] if plugins else []
    recipe, host = load_recipe(RECIPE, BASE + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                                               f"output_dir={out}", f"checkpoint.dir={out}/ck"] + extra + overrides)
    return Engine(recipe, host, cpu=True)


def _losses(eng, steps: int) -> list[float]:
    return [eng.trainer.train_step().metrics["loss"] for _ in range(steps)]


def _generated(eng) -> dict[int, list[int]]:
    """sample id -> generated response of the last rollout on this rank."""
    rec = eng.sequences.last
    out = {}
    for batch, responses in zip(rec.batches, rec.responses):
        for sid, resp in zip(batch["sample_ids"].tolist(), responses):
            if resp is not None:
                out[int(sid)] = list(resp)
    return out


def single_body(rank: int, world: int, out: str, module: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.engine.generate import GenerationConfig, generate
    from distill_plugins.engine.sequences import row_seed

    enable_cpu_mode()
    res: dict = {}
    steps = 3
    # -- dataset vs mixed(lambda 0): the same losses, bit for bit ------------------------------
    eng = _engine(1, 1, f"{out}/dataset", ["sequences=dataset"])
    res["dataset"] = _losses(eng, steps)
    res["dataset_keys"] = sorted(eng.trainer.train_step().metrics)
    eng = _engine(1, 1, f"{out}/mixed0", ["sequences={name: mixed, lmbda: 0.0, max_new_tokens: %d}" % NEW])
    results = [eng.trainer.train_step() for _ in range(steps)]
    res["mixed0"] = [r.metrics["loss"] for r in results]
    res["mixed0_figures"] = [(r.metrics["on_policy_fraction"], r.metrics["generated_tokens"]) for r in results]

    # -- mixed(lambda 1): student samples only; the batch holds what generate() gives ------------
    eng = _engine(1, 1, f"{out}/mixed1", ["sequences={name: mixed, lmbda: 1.0, max_new_tokens: %d}" % NEW])
    stage = eng.trainer.stage
    sampler = [p.detach().clone() for p in stage.student.parameters()]  # the student that samples in step 1
    r = eng.trainer.train_step()
    res["mixed1"] = {k: r.metrics[k] for k in ("on_policy_fraction", "generated_tokens", "gen_s", "loss")}
    with torch.no_grad():
        res["mixed1_trained"] = any(not torch.equal(p, q) for p, q in zip(stage.student.parameters(), sampler))
        for p, q in zip(stage.student.parameters(), sampler):
            p.copy_(q)
    rec = eng.sequences.last
    checks = []
    for batch, responses in zip(rec.batches, rec.responses):
        s = batch["prompt_tokens"].shape[1]
        prompts = [batch["prompt_tokens"][i, s - int(n):].tolist() for i, n in enumerate(batch["prompt_lengths"])]
        seeds = [row_seed(eng.recipe.seed, 0, int(sid)) for sid in batch["sample_ids"]]
        again = generate(stage.student, prompts, GenerationConfig(max_new_tokens=NEW, temperature=1.0,
                                                                  eos_token_id=eng.sequences.eos_id),
                         seeds=seeds).responses()
        for i, (prompt, resp) in enumerate(zip(prompts, responses)):
            # the window rule of docs/sequences.md: a prompt too long for prompt + response loses its left end
            window, n_p = s + 1, len(prompt)
            keep = n_p if n_p + len(resp) <= window else min(n_p, max(window - len(resp), window // 2))
            x = (prompt[n_p - keep:] + resp)[:window]
            labels = batch["labels"][i]
            want = torch.full_like(labels, IGNORE_INDEX)
            want[keep - 1: len(x) - 1] = torch.tensor(x[keep:])
            checks.append(dict(
                same_as_generate=resp == again[i],
                tokens=batch["tokens"][i, :min(len(x), s)].tolist() == x[:s],
                labels=torch.equal(labels, want),
                mask=torch.equal(batch["loss_mask"][i], (want != IGNORE_INDEX).float()),
                origin=int(batch["response_origin"][i]) == FROM_STUDENT))
    res["mixed1_rows"] = checks

    # -- a third-party source registered through the hook, named by the recipe -----------------
    eng = _engine(1, 1, f"{out}/plugin", ["sequences={name: every_other_test, period: 2}"], plugins=(module,))
    r = eng.trainer.train_step()
    rec = eng.sequences.last
    res["plugin"] = dict(
        source=type(eng.sequences.source).__name__, fraction=r.metrics["on_policy_fraction"],
        origins=[b["response_origin"].tolist() for b in rec.batches],
        lengths=[[None if x is None else len(x) for x in resp] for resp in rec.responses],
        dataset_rows_kept=all(torch.equal(b[k][i], d[k][i]) for b, d, resp in zip(rec.batches, rec.inputs, rec.responses)
                              for i, x in enumerate(resp) if x is None for k in ("tokens", "labels", "loss_mask")),
        student_rows_changed=all(not torch.equal(b["labels"][i], d["labels"][i]) for b, d, resp in
                                 zip(rec.batches, rec.inputs, rec.responses) for i, x in enumerate(resp)
                                 if x is not None))
    return res


def four_body(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    res: dict = {"layouts": {}}
    sampling = "max_new_tokens: %d, temperature: 1.0, top_k: 50" % NEW
    # -- the same seed, the same samples under every layout (first step: equal weights) ---------
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        eng = _engine(tp, pp, f"{out}/layout_{tp}{pp}", ["sequences={name: on_policy, %s}" % sampling])
        r = eng.trainer.train_step()
        res["layouts"][(tp, pp)] = dict(generated=_generated(eng), fraction=r.metrics["on_policy_fraction"],
                                        tokens=r.metrics["generated_tokens"])

    # -- resume mid-run with on-policy steps (TP=2 x PP=2); its first step is the TP=2 x PP=2 layout
    # (lambda starts at 1: every row sampled from the student with the same sampling parameters)
    mixed = "sequences={name: mixed, lmbda: 0.5, lambda_start: 1.0, lambda_warmup_steps: 4, %s}" % sampling
    eng = _engine(2, 2, f"{out}/straight", [mixed, "training.steps=3"])
    straight = []
    for _ in range(3):
        r = eng.trainer.train_step()
        straight.append((r.metrics["loss"], r.metrics["on_policy_fraction"], _generated(eng)))
        if eng.trainer.step == 1:
            res["layouts"][(2, 2)] = dict(generated=_generated(eng), fraction=r.metrics["on_policy_fraction"],
                                          tokens=r.metrics["generated_tokens"])
        if eng.trainer.step == 2:
            eng.save()
    resumed_eng = _engine(2, 2, f"{out}/resumed", [mixed, "training.steps=3",
                                                   f"checkpoint.resume={out}/straight/ck/step_000002"])
    start = resumed_eng.trainer.step
    r = resumed_eng.trainer.train_step()
    resumed = [(r.metrics["loss"], r.metrics["on_policy_fraction"], _generated(resumed_eng))]
    res["resume"] = dict(start=start, straight=straight[2:], resumed=resumed, fractions=[s[1] for s in straight])
    return res


# ---------------------------------------------------------------------------
# Fixtures: one process group each
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("on_policy_single"))
    return run_distributed(single_body, world_size=1, args=(out, __name__))[0]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("on_policy_four"))
    return run_distributed(four_body, world_size=4, args=(out,))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_mixed_lambda_0_reproduces_the_dataset_source(single):
    assert single["mixed0"] == single["dataset"]  # exact: the data's batches, untouched
    assert single["mixed0_figures"] == [(0.0, 0.0)] * 3
    assert "gen_s" not in single["dataset_keys"]  # the dataset source adds no generation figures


def test_mixed_lambda_1_trains_on_student_samples_only(single):
    m = single["mixed1"]
    assert m["on_policy_fraction"] == 1.0
    assert 8 <= m["generated_tokens"] <= 8 * NEW and m["gen_s"] > 0
    assert single["mixed1_trained"]  # the step updated the student (the check regenerates from the old one)
    rows = single["mixed1_rows"]
    assert len(rows) == 8
    for row in rows:
        assert row == dict(same_as_generate=True, tokens=True, labels=True, mask=True, origin=True), row


def test_a_third_party_source_from_a_plugin_is_used(single):
    p = single["plugin"]
    assert p["source"] == "EveryOther"
    assert p["fraction"] == 0.5
    assert p["origins"] == [[FROM_STUDENT, FROM_DATASET]] * 4
    for lengths in p["lengths"]:
        assert lengths[1] is None and 1 <= lengths[0] <= 5  # its own SamplingParams (max_new_tokens 5)
    assert p["dataset_rows_kept"] and p["student_rows_changed"]


def test_generated_tokens_equal_across_layouts(four):
    merged = {}
    for layout in ((1, 1), (2, 1), (1, 2), (2, 2)):
        per_sample: dict = {}
        for rank_result in four:
            for sid, resp in rank_result["layouts"][layout]["generated"].items():
                assert per_sample.setdefault(sid, resp) == resp  # every TP/PP rank of a replica agrees
        assert sorted(per_sample) == list(range(8)), layout  # the step's 8 samples, over the DP ranks
        merged[layout] = per_sample
        assert four[0]["layouts"][layout]["fraction"] == 1.0
        assert four[0]["layouts"][layout]["tokens"] == sum(len(r) for r in per_sample.values())
    reference = merged[(1, 1)]
    for layout, per_sample in merged.items():
        assert per_sample == reference, layout
    assert len({tuple(r) for r in reference.values()}) > 1  # rows sample differently


def test_resume_with_on_policy_steps_is_bit_exact(four):
    for rank_result in four:
        r = rank_result["resume"]
        assert r["start"] == 2
        assert r["resumed"] == r["straight"]  # loss, fraction and generated tokens of step 3, exactly
        assert r["fractions"][0] == 1.0 and 0 < r["resumed"][0][1] < 1  # lambda 1 -> 0.75: a real mix
        assert r["resumed"][0][2]  # step 3 generated on this rank


# -- refusals (in-process) -------------------------------------------------------------------


def test_check_refuses_a_generating_source_without_prompts_or_teacher():
    from distill_plugins.recipe.load import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, ["data.kind=synthetic", "sequences=on_policy"])
    assert any("data.kind='synthetic' has no prompts" in e for e in err.value.errors)
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, ["sequences=teacher_generated", "loss.kd_weight=0", "loss.ce_weight=1"])
    assert any("loss.kd_weight=0 builds no teacher" in e for e in err.value.errors)
    recipe, _ = load_recipe(RECIPE, ["data.kind=synthetic", "sequences=dataset"])  # the data's responses: fine
    assert recipe.sequences.name == "dataset"


def test_run_refuses_the_same_when_the_recipe_skipped_the_check():
    import dataclasses

    from distill_plugins.engine.sequences import SequenceRuntime
    from distill_plugins.manager import build_plugin_host
    from distill_plugins.parallel import ParallelContext
    from distill_plugins.recipe.load import load_recipe
    from distill_plugins.recipe.schema import DataSpec, PartSpec

    recipe, host = load_recipe(RECIPE)
    bad = dataclasses.replace(recipe, data=DataSpec(kind="synthetic", seq_length=32),
                              sequences=PartSpec(name="mixed", params={"lmbda": 0.3}))
    with pytest.raises(RecipeError, match="has no prompts"):
        SequenceRuntime.build(bad, build_plugin_host(), ctx=ParallelContext())

    class TwoTokenizers:
        text_batches = True

    with pytest.raises(RecipeError, match="re-tokenizing generated text"):
        SequenceRuntime.build(recipe, host, ctx=ParallelContext(), aligner=TwoTokenizers())


def test_rebuilt_rows_follow_the_window_rule():
    from distill_plugins.engine.sequences import rebuild_batch

    s, eos = 8, 0
    prompt_tokens = torch.tensor([[eos, eos, eos, eos, eos, 11, 12, 13],    # L = 3
                                  [21, 22, 23, 24, 25, 26, 27, 28],         # L = 8: prompt + response > s + 1
                                  [eos, eos, eos, eos, eos, eos, 31, 32]])  # L = 2, the data's row is kept
    data_tokens = torch.arange(3 * s).reshape(3, s)
    data_labels = torch.full((3, s), IGNORE_INDEX)
    data_labels[2, 3:6] = torch.tensor([7, 8, 9])
    batch = {"tokens": data_tokens, "labels": data_labels, "loss_mask": (data_labels != IGNORE_INDEX).float(),
             "prompt_tokens": prompt_tokens, "prompt_lengths": torch.tensor([3, 8, 2]),
             "position_ids": torch.arange(s).expand(3, s), "sample_ids": torch.tensor([4, 5, 6])}
    origin = torch.tensor([FROM_STUDENT, FROM_STUDENT, FROM_DATASET])
    out = rebuild_batch(batch, [[41, 42, eos], [51, 52, 53], None], origin, pad_id=eos)
    # row 0: x = 11 12 13 41 42 eos (6 <= 9 tokens); labels on the response only
    assert out["tokens"][0].tolist() == [11, 12, 13, 41, 42, eos, eos, eos]
    assert out["labels"][0].tolist() == [-100, -100, 41, 42, eos, -100, -100, -100]
    # row 1: 8 + 3 > 9: the prompt keeps min(8, max(9 - 3, 9 // 2)) = 6 tokens (23..28)
    assert out["tokens"][1].tolist() == [23, 24, 25, 26, 27, 28, 51, 52]
    assert out["labels"][1].tolist() == [-100, -100, -100, -100, -100, 51, 52, 53]
    # row 2: the data's, bit for bit
    assert torch.equal(out["tokens"][2], data_tokens[2]) and torch.equal(out["labels"][2], data_labels[2])
    assert torch.equal(out["loss_mask"], (out["labels"] != IGNORE_INDEX).float())
    assert out["response_origin"].tolist() == origin.tolist() and out["sample_ids"] is batch["sample_ids"]
    assert torch.equal(batch["tokens"], data_tokens)  # the input is not modified
