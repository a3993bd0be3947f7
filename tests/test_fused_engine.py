"""The engine on the fused output layer (``loss.fused_output_layer``) against the materialised logits.

One 2-process gloo job for the module (:func:`worker`) trains a tiny recipe for a
few steps twice per case, ``fused_output_layer: true`` and ``false``, from the same
weights and data, and compares the step losses (``loss``, ``kd_loss``, ``ce_loss``),
the kept-token counts and gradient norms of every step, the first step's gradient
(every element of megatron's grad buffers, before the optimizer) and every student
parameter tensor after the last step (relative norm of the difference). Layouts:
TP=1 (DP=2), TP=2, PP=2 (sequence parallelism needs Transformer Engine's norms,
absent on CPU: its gather is checked at the loss level in tests/test_fused_output_layer.py).
Cases: forward KL with a
CE mix (trained and logged), CSD, AdaKD (LATF selector + IDTS temperatures, the
statistics pass), AdaSPEC (the reference model's hidden states through the
pipeline). The student has tied embeddings and a padded vocabulary (250 -> 256).
In-process: ``auto`` falls back with one notice for a plugin objective that does not
declare the fused contract, ``true`` with it is a recipe error at check, the stage
hands hidden states and weights (no logits) to the loss.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from distill_plugins.testing.distributed import run_distributed

VOCAB = 250
SEQ = 16
STEPS = 3
TOL = 1e-5

CASES = {
    "fkl_ce": dict(objective={"name": "forward_kl"}, ce_weight=0.5),
    "csd": dict(objective={"name": "csd", "params": {"w1": "U", "w2": "S"}}),
    "adakd": dict(objective={"name": "forward_kl"},
                  selector={"name": "latf", "params": {"warmup_fraction": 0.0, "initial_ratio": 0.6,
                                                       "max_ratio": 0.6}},
                  temperature={"name": "idts", "params": {"c": 0.5}}),
    "adaspec": dict(objective={"name": "forward_kl"}, selector={"name": "adaspec", "params": {"fraction": 0.5}},
                    reference=True),
}
#: (tp, pp, sequence_parallel) -> cases run on that layout
LAYOUTS = {
    (1, 1, False): ("fkl_ce", "csd", "adakd", "adaspec"),
    (2, 1, False): ("fkl_ce", "csd", "adakd", "adaspec"),
    (1, 2, False): ("fkl_ce", "adakd", "adaspec"),
}


def _recipe(tp: int, pp: int, sp: bool, case: str, fused, out: str, objective=None):
    from distill_plugins.recipe.schema import (CheckpointSpec, DataSpec, LossSpec, ModelSpec, ParallelSpec, PartSpec,
                                               Recipe, TrainingSpec)

    c = CASES[case]
    student = ModelSpec(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        vocab_size=VOCAB, max_position_embeddings=64, tie_embeddings=True)
    part = lambda spec: PartSpec(name=spec["name"], params=dict(spec.get("params", {})))  # noqa: E731
    return Recipe(
        student=student,
        teacher=ModelSpec(arch="gpt2", num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=64),
        reference=student if c.get("reference") else None,
        parallel=ParallelSpec(tensor=tp, pipeline=pp, sequence_parallel=sp, make_vocab_size_divisible_by=16),
        data=DataSpec(kind="synthetic", seq_length=SEQ),
        training=TrainingSpec(steps=STEPS, micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=0,
                              lr_decay="constant", clip_grad=1.0),
        checkpoint=CheckpointSpec(resume="none", interval=0),
        loss=LossSpec(kd_weight=1.0, ce_weight=c.get("ce_weight", 0.0), fused_output_layer=fused),
        objective=part(objective or c["objective"]),
        selector=part(c.get("selector", {"name": "all"})),
        temperature=part(c.get("temperature", {"name": "constant"})),
        device="cpu", seed=5, output_dir=out,
    )


def _engine(recipe, host=None):
    from megatron.core import parallel_state as ps

    from distill_plugins.data.synthetic import SyntheticBatches
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.run import Engine
    from distill_plugins.manager import build_plugin_host

    if ps.model_parallel_is_initialized():
        dps.destroy()
    ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=True)
    data = SyntheticBatches(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2, global_batch_size=4,
                            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=11)
    eng = Engine(recipe, host or build_plugin_host(), cpu=True, data=data)
    with torch.no_grad():  # a random teacher is nearly uniform: sharpen it (frozen, outside the optimizer)
        for name, p in eng.trainer.stage.teacher.named_parameters():
            if name == "output_layer.weight":
                p.mul_(20.0)
    return eng


def _train(recipe) -> dict:
    eng = _engine(recipe)
    stage = eng.trainer.stage
    steps = [eng.trainer.train_step().metrics]
    grads = torch.cat([b.grad_data.detach().float().clone() for b in eng.trainer.model.buffers])  # step 1, pre-Adam
    steps += [eng.trainer.train_step().metrics for _ in range(STEPS - 1)]
    params = {k: v.detach().clone() for k, v in stage.student.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return {"steps": steps, "params": params, "grads": grads, "fused": stage.fused, "last": stage.last_stage}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _compare(fused: dict, mat: dict) -> dict:
    out = {"fused_on": fused["fused"] or not fused["last"], "mat_off": not mat["fused"]}
    for key in ("loss", "kd_loss", "ce_loss", "kept_tokens", "grad_norm"):
        out[key] = max(_rel(f[key], m[key]) for f, m in zip(fused["steps"], mat["steps"]))
    # Adam divides each gradient by its own running RMS, so an element whose gradient is ~0 moves by up to lr
    # on rounding noise alone: weights are compared tensor by tensor in norm, the gradients element by element.
    out["params"] = max(((fused["params"][k] - v).norm() / v.norm().clamp_min(1e-30)).item()
                        for k, v in mat["params"].items())
    g_f, g_m = fused["grads"], mat["grads"]
    out["grads"] = ((g_f - g_m).abs().max() / g_m.abs().max().clamp_min(1e-30)).item()
    out["losses"] = [s["loss"] for s in mat["steps"]]
    return out


def _stage_output_kinds(rank: int, out: str) -> dict:
    """The last stage hands hidden states and weights, no logits; the tied weight is the embedding's."""
    from distill_plugins.engine.stage import forward_backward

    seen = {}
    recipe = _recipe(1, 1, False, "fkl_ce", True, out)
    eng = _engine(recipe)
    stage = eng.trainer.stage

    def loss_fn(batch, output):
        seen.update(fused=output.fused, logits=output.student_logits, teacher_logits=output.teacher_logits,
                    hidden=tuple(output.student_hidden.shape), weight_is_embedding=output.student_weight is
                    stage.student.embedding.word_embeddings.weight, weight_rows=output.student_weight.shape[0],
                    teacher_hidden=tuple(output.teacher_hidden.shape))
        return eng.trainer._loss_fn(batch, output)

    forward_backward(eng.trainer.model, eng.trainer.data, loss_fn, num_microbatches=1, seq_length=SEQ,
                     micro_batch_size=2, forward_only=True)
    # outside the stage's forward the taps call megatron's own output layer: logits as usual
    h = torch.randn(SEQ, 2, 32)
    logits, _ = stage.student.output_layer(h, weight=stage.student.embedding.word_embeddings.weight)
    seen["direct_logits"] = tuple(logits.shape)
    return seen


def worker(rank: int, world: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    res: dict = {}
    for (tp, pp, sp), cases in LAYOUTS.items():
        for case in cases:
            name = f"tp{tp}pp{pp}{'sp' if sp else ''}_{case}"
            runs = {f: _train(_recipe(tp, pp, sp, case, f, os.path.join(out, name, str(f)))) for f in (True, False)}
            res[name] = _compare(runs[True], runs[False])
    res["stage"] = _stage_output_kinds(rank, os.path.join(out, "stage"))
    res["fallback"] = _fallback(os.path.join(out, "fallback"))
    return res


def _fallback(out: str) -> dict:
    """``auto`` with a plugin objective that keeps the logits: one notice naming it, materialised training."""
    from distill_plugins.recipe.validate import validate_recipe_data

    host = _plugin_host()
    recipe, _ = validate_recipe_data(_recipe_data("auto") | {"output_dir": out}, host=host)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("distill_plugins")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        eng = _engine(recipe, host)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    metrics = eng.trainer.train_step().metrics
    return {"notices": [m for m in messages if "fused_output_layer=auto" in m], "fused": eng.trainer.stage.fused,
            "loss": metrics["loss"], "ce_loss": metrics["ce_loss"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(worker, 2, args=(str(tmp_path_factory.mktemp("fused_engine")),))


NAMES = [f"tp{tp}pp{pp}{'sp' if sp else ''}_{case}" for (tp, pp, sp), cases in LAYOUTS.items() for case in cases]


@pytest.mark.parametrize("name", NAMES)
def test_fused_training_equals_materialised(runs, name):
    for rank, res in enumerate(runs):
        r = res[name]
        assert r["fused_on"] and r["mat_off"], (rank, r)
        keys = ("loss", "kd_loss", "ce_loss", "kept_tokens", "grad_norm", "grads", "params")
        bad = {k: r[k] for k in keys if r[k] > TOL}
        assert not bad, f"{name} rank {rank}: relative differences above {TOL}: {bad}"
        assert len(set(round(x, 6) for x in r["losses"])) > 1, f"{name}: the loss never moved: {r['losses']}"


def test_last_stage_hands_hidden_states_and_weights(runs):
    s = runs[0]["stage"]
    assert s["fused"] and s["logits"] is None and s["teacher_logits"] is None
    assert s["hidden"] == (SEQ, 2, 32) and s["teacher_hidden"] == (SEQ, 2, 48)
    assert s["weight_is_embedding"] and s["weight_rows"] == 256  # tied embeddings, 250 padded to 256
    assert s["direct_logits"] == (SEQ, 2, 256)


# --------------------------------------------------------------------------- in process: fallback and errors


def _plugin_host():
    from distill_plugins.manager import build_plugin_host
    from distill_plugins.objectives.kl import ForwardKL

    class LogitsOnlyKL(ForwardKL):
        """A plugin objective that keeps the materialised path (no fused contract)."""

        supports_fused_output_layer = False

    host = build_plugin_host()
    host.registry("objective").add("logits_only_kl", LogitsOnlyKL, plugin="test_fused_engine")
    return host


def _recipe_data(fused) -> dict:
    return {"device": "cpu", "student": {"arch": "llama", "num_layers": 2, "hidden_size": 32,
                                          "num_attention_heads": 4, "vocab_size": VOCAB},
            "teacher": {"arch": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                        "vocab_size": VOCAB},
            "data": {"kind": "synthetic", "seq_length": SEQ}, "objective": "logits_only_kl",
            "loss": {"fused_output_layer": fused, "ce_weight": 0.5}, "seed": 3,
            "checkpoint": {"resume": "none", "interval": 0},
            "training": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 4}}


def test_true_with_an_unsupported_objective_is_a_check_error():
    from distill_plugins.errors import RecipeError
    from distill_plugins.recipe.validate import validate_recipe_data

    host = _plugin_host()
    with pytest.raises(RecipeError, match="logits_only_kl") as err:
        validate_recipe_data(_recipe_data(True), host=host)
    assert "fused_output_layer: auto" in str(err.value) and "supports_fused_output_layer" in str(err.value)
    for ok in ("auto", False):
        validate_recipe_data(_recipe_data(ok), host=host)
    data = _recipe_data(True) | {"objective": "forward_kl", "teacher_parallel": {"ranks": 1}}
    with pytest.raises(RecipeError, match="teacher_parallel: a teacher on its own ranks sends its logits"):
        validate_recipe_data(data, host=host)
    with pytest.raises(RecipeError, match="fused_output_layer"):
        validate_recipe_data(_recipe_data("yes"), host=host)


def test_auto_falls_back_with_one_notice(runs):
    for rank, res in enumerate(runs):
        r = res["fallback"]
        assert len(r["notices"]) == 1 and "logits_only_kl" in r["notices"][0], (rank, r["notices"])
        assert "supports_fused_output_layer" in r["notices"][0]
        assert not r["fused"]
        assert r["loss"] > 0 and r["ce_loss"] > 0


# --------------------------------------------------------------------------- the planner's figure

CLUSTER = "recipes/cluster/qwen2.5-7b-to-qwen2.5-1.5b_csd_tp1pp1-2x8.yaml"


def test_plan_shows_the_fused_loss_figure():
    from distill_plugins import plan as planner
    from distill_plugins.cli.plan import plan_recipe
    from distill_plugins.objectives.fused import DEFAULT_CHUNK_LOGITS, MIN_CHUNK_ROWS

    assert (planner.FUSED_CHUNK_LOGITS, planner.FUSED_MIN_CHUNK_ROWS) == (DEFAULT_CHUNK_LOGITS, MIN_CHUNK_ROWS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, CLUSTER)
    line = {}
    for setting in ("auto", "true", "false"):
        report = plan_recipe(path, nodes=2, gpus_per_node=8, overrides=[f"loss.fused_output_layer={setting}"])
        line[setting] = report.memory.line("loss logits")
    v, h_s, h_t, tokens = 151680, 1536, 3584, 4096
    fused = 5 * 256 * v * 4 + 4 * v * h_s + tokens * 2 * (2 * h_s + h_t)
    assert line["auto"].bytes == line["true"].bytes == (fused,)
    assert line["false"].bytes == (tokens * 4 * (3 * v + v),)  # student logits + 2 workspaces + teacher logits
    assert "fused output layer" in line["auto"].formula and "fused" not in line["false"].formula
    assert line["false"].bytes[0] / fused > 5
