"""One HF-config parser: ``distill plan``, ``distill check`` and ``distill run`` accept and refuse the same models.

The same set of ``config.json`` files (supported llama / qwen2 / mistral / gpt2, and
every kind the conversion refuses) is fed to

* ``distill plan`` (:func:`distill_plugins.cli.plan.plan_recipe`),
* ``distill check`` (the CLI, exit status 0 or 2),
* ``distill run``'s path up to building models: recipe validation
  (:func:`~distill_plugins.recipe.load.load_recipe`), then spec resolution
  (:func:`distill_plugins.engine.run.resolve_specs`, also on a recipe that skipped
  validation), and the importer's config read (:func:`~distill_plugins.models.hf_config.read_hf_config`),

and each either accepts the directory in all of them or refuses it in all of them,
with a message naming the offending key. A model directory absent from this
machine is the one documented difference: plan and check fall back to the
recipe's shape keys with a warning (cluster recipes checked on a laptop), run
refuses. ``checkpoint:`` specs read the ``distill_model.json`` saved beside the
weights (issue: it used to be ignored).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_plugins.cli import main
from distill_plugins.cli.plan import plan_recipe
from distill_plugins.engine.run import resolve_specs
from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.manager import NO_ENTRY_POINTS_ENV
from distill_plugins.models.checkpoint_meta import CheckpointMeta, write_meta_file
from distill_plugins.models.hf_config import HFArchitecture, parse_hf_config, read_hf_config
from distill_plugins.models.model_info import describe_model
from distill_plugins.models.resolve import resolve_model
from distill_plugins.recipe.load import load_recipe
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec, Recipe

VOCAB = 128
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}
QWEN2 = {**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True,
         "use_sliding_window": False, "sliding_window": 32}
MISTRAL = {**LLAMA, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 32}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "vocab_size": VOCAB, "activation_function": "gelu_new"}


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


#: name -> (config.json content or None for no file, fragment every refusal must contain, or None: accepted)
CASES = {
    "llama": (LLAMA, None),
    "qwen2": (QWEN2, None),
    "mistral_sliding_window": (MISTRAL, None),
    "gpt2": (GPT2, None),
    "gpt2_untied": ({**GPT2, "tie_word_embeddings": False}, None),
    "no_config_json": (None, "has no config.json"),
    "invalid_json": ("{not json", "not valid JSON"),
    "unsupported_model_type": ({**LLAMA, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]},
                               "model_type 'phi3'"),
    "no_causal_lm_head": ({**LLAMA, "architectures": ["LlamaModel"]}, "no causal-LM head"),
    "gpt2_scale_attn_by_inverse_layer_idx": ({**GPT2, "scale_attn_by_inverse_layer_idx": True},
                                             "scale_attn_by_inverse_layer_idx"),
    "gpt2_relu": ({**GPT2, "activation_function": "relu"}, "activation_function='relu'"),
    "llama_rope_linear": ({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    "llama_rope_llama3_v5": ({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "'llama3'"),
    "llama_attention_bias": ({**LLAMA, "attention_bias": True}, "attention_bias"),
    "llama_mlp_bias": ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
    "llama_gelu": ({**LLAMA, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    "llama_decoupled_head_dim": ({**LLAMA, "head_dim": 16}, "head_dim=16"),
    "llama_kv_heads_not_dividing": ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads=3"),
    "llama_missing_intermediate_size": (_without(LLAMA, "intermediate_size"), "intermediate_size is missing"),
    "llama_string_layers": ({**LLAMA, "num_hidden_layers": "2"}, "num_hidden_layers='2'"),
    "llama_qk_norm": ({**LLAMA, "qk_norm": True}, "q/k normalisation"),
}


@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")


def _model_dir(root: Path, name: str, config) -> Path:
    path = root / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _recipe(root: Path) -> Path:
    """A tiny recipe: student from ``student.hf`` (set per case), an inline teacher of the same vocabulary."""
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "device": "cpu",
        "teacher": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": VOCAB,
                    "max_position_embeddings": 64},
        "parallel": {"make_vocab_size_divisible_by": 16},
        "data": {"kind": "synthetic", "seq_length": 16},
        "training": {"steps": 1, "micro_batch_size": 1, "global_batch_size": 1},
        "checkpoint": {"interval": 0, "resume": "none"},
        "objective": "forward_kl",
    }))
    return path


def _plan(recipe: Path, model: Path) -> str | None:
    try:
        plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=[f"student.hf={model}"])
    except RecipeError as exc:
        return str(exc)
    return None


def _check(recipe: Path, model: Path, capsys) -> str | None:
    code = main(["check", str(recipe), f"student.hf={model}"])
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    return captured.err if code == 2 else None


def _run(recipe: Path, model: Path) -> str | None:
    """What ``distill run`` does before building models: validate, then resolve the specs."""
    try:
        loaded, _ = load_recipe(recipe, [f"student.hf={model}"])
        resolve_specs(loaded)
    except DistillError as exc:
        return str(exc)
    return None


def _resolve_unvalidated(model: Path) -> str | None:
    """The run's spec resolution on its own (a recipe built in Python skips validation)."""
    try:
        resolve_specs(Recipe(student=ModelSpec(hf=str(model)), teacher=ModelSpec(vocab_size=VOCAB)))
    except DistillError as exc:
        return str(exc)
    return None


def _importer(model: Path) -> str | None:
    try:
        read_hf_config(str(model))
    except DistillError as exc:
        return str(exc)
    return None


def test_plan_check_and_run_accept_and_refuse_the_same_configs(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    outcomes = {}
    for name, (config, fragment) in CASES.items():
        model = _model_dir(tmp_path, name, config)
        results = {"plan": _plan(recipe, model), "check": _check(recipe, model, capsys), "run": _run(recipe, model),
                   "resolve": _resolve_unvalidated(model), "import": _importer(model)}
        outcomes[name] = {where: message is None for where, message in results.items()}
        expected = fragment is None
        assert set(outcomes[name].values()) == {expected}, f"{name}: accepted where True: {outcomes[name]}"
        if fragment is not None:
            for where, message in results.items():
                assert fragment in message, f"{name}: {where}'s refusal does not name {fragment!r}: {message}"
    refused = [name for name, (_, fragment) in CASES.items() if fragment]
    assert len(refused) == 16 and len(CASES) - len(refused) == 5


def test_absent_model_directory_is_a_warning_for_plan_and_check_and_an_error_for_run(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    absent = tmp_path / "not-on-this-machine"
    overrides = [f"student.hf={absent}", f"student.vocab_size={VOCAB}"]
    report = plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=overrides)
    assert f"student: model directory {absent} not found; using the shape keys from the recipe" in report.warnings
    assert main(["check", str(recipe), *overrides]) == 0
    capsys.readouterr()
    loaded, _ = load_recipe(recipe, overrides)
    with pytest.raises(DistillError, match="does not exist"):
        resolve_specs(loaded)


def test_accepted_configs_give_the_same_shape_to_plan_check_and_run(tmp_path):
    recipe = _recipe(tmp_path)
    for name in ("qwen2", "gpt2", "mistral_sliding_window"):
        config = CASES[name][0]
        model = _model_dir(tmp_path, name, config)
        student = plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=[f"student.hf={model}"]).shapes[0]
        info = describe_model(ModelSpec(hf=str(model)), ParallelSpec(make_vocab_size_divisible_by=16))
        run_spec = resolve_specs(load_recipe(recipe, [f"student.hf={model}"])[0]).student
        for spec in (info.spec, run_spec):
            assert (spec.arch, spec.num_layers, spec.hidden_size, spec.vocab_size, spec.tie_embeddings,
                    spec.add_qkv_bias or spec.arch == "gpt2") == \
                (student.arch, student.num_layers, student.hidden_size, student.vocab_size, student.tie_embeddings,
                 student.add_qkv_bias)
        # what the planner used to get wrong: gpt2 ties only when config.json says so; qwen2 ties here
        assert student.tie_embeddings == config.get("tie_word_embeddings", name == "gpt2")
        assert info.family == name.split("_")[0]


def test_sliding_window_is_accepted_with_the_same_note_everywhere(tmp_path, caplog):
    recipe = _recipe(tmp_path)
    model = _model_dir(tmp_path, "mistral", MISTRAL)
    report = plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=[f"student.hf={model}"])
    assert any("student:" in w and "sliding_window=32 is not emulated" in w for w in report.warnings)
    with caplog.at_level("WARNING"):
        load_recipe(recipe, [f"student.hf={model}"])
    assert "sliding_window=32 is not emulated" in caplog.text
    assert read_hf_config(str(model)).notes == resolve_model(ModelSpec(hf=str(model))).notes
    # qwen2 leaves its window off unless use_sliding_window is true
    assert read_hf_config(str(_model_dir(tmp_path, "qwen2", QWEN2))).notes == ()


def test_exported_configs_parse_back_to_the_same_architecture():
    for family, spec in (("llama", ModelSpec(num_query_groups=2, vocab_size=90)),
                         ("qwen2", ModelSpec(add_qkv_bias=True, tie_embeddings=True, vocab_size=90)),
                         ("mistral", ModelSpec(vocab_size=90, rotary_base=1e6)),
                         ("gpt2", ModelSpec(arch="gpt2", tie_embeddings=True, vocab_size=90))):
        arch = HFArchitecture.from_model_spec(spec, family=family)
        back = parse_hf_config(arch.hf_config(), "exported")
        assert back.spec_fields() == arch.spec_fields() and back.family == family


def test_student_checkpoint_reads_distill_model_json(tmp_path, capsys):
    """``student: {checkpoint: ...}`` takes its shape from distill_model.json, as ``megatron:`` does."""
    saved = ModelSpec(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                      max_position_embeddings=64, tie_embeddings=True)
    step = tmp_path / "run" / "checkpoints" / "step_10"
    (step / "model_dist").mkdir(parents=True)
    write_meta_file(CheckpointMeta(spec=saved, vocab_size=VOCAB, padded_vocab_size=VOCAB), str(step))
    recipe = _recipe(tmp_path)
    resolved = resolve_specs(Recipe(student=ModelSpec(checkpoint=str(step)), teacher=ModelSpec(vocab_size=VOCAB)))
    assert resolved.student.checkpoint == str(step)
    assert dataclasses.replace(resolved.student, checkpoint=None) == saved
    student = plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=[f"student.checkpoint={step}"]).shapes[0]
    assert (student.num_layers, student.hidden_size, student.source) == (4, 48, f"{step}/distill_model.json")
    info = describe_model(ModelSpec(checkpoint=str(step)), ParallelSpec())
    assert info.spec.num_layers == 4 and info.source == f"checkpoint:{step}"
    # without the file: a clear error naming it, for the run and the planner alike
    (step / "distill_model.json").unlink()
    with pytest.raises(DistillError, match="has no distill_model.json"):
        resolve_specs(Recipe(student=ModelSpec(checkpoint=str(step)), teacher=ModelSpec(vocab_size=VOCAB)))
    with pytest.raises(RecipeError, match="has no distill_model.json"):
        plan_recipe(recipe, nodes=1, gpus_per_node=1, overrides=[f"student.checkpoint={step}"])


def test_check_and_plan_import_no_megatron(tmp_path):
    """The config path (parser, resolution, planner, ``distill check``) never imports megatron-core (seconds)."""
    recipe = _recipe(tmp_path)
    model = _model_dir(tmp_path, "llama", LLAMA)
    code = (
        "import sys\n"
        "from distill_plugins.cli import main\n"
        f"assert main(['check', {str(recipe)!r}, 'student.hf={model}']) == 0\n"
        f"assert main(['plan', {str(recipe)!r}, '--nodes', '1', '--gpus-per-node', '1', 'student.hf={model}']) == 0\n"
        "import distill_plugins.models.hf_mapping, distill_plugins.models.model_info\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'megatron')\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, NO_ENTRY_POINTS_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
