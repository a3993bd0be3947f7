"""Recipes: extends, overrides, validation that gathers every error, the run record, shipped recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from distill_plugins.cli import main
from distill_plugins.errors import RecipeError
from distill_plugins.manager import NO_ENTRY_POINTS_ENV
from distill_plugins.recipe.load import apply_overrides, load_recipe, load_recipe_data
from distill_plugins.recipe.record import write_run_record

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_extends_deep_merges_and_part_sections_replace_on_new_name(tmp_path):
    write(tmp_path / "base.yaml", {"training": {"steps": 5, "lr": 0.1}, "objective": {"name": "csd", "w1": "U"}})
    write(tmp_path / "child.yaml", {"extends": "base.yaml", "training": {"steps": 7}, "objective": "forward_kl"})
    data = load_recipe_data(tmp_path / "child.yaml")
    assert data["training"] == {"steps": 7, "lr": 0.1}
    assert data["objective"] == {"name": "forward_kl"}  # the base's w1 does not leak
    write(tmp_path / "same.yaml", {"extends": "base.yaml", "objective": {"w2": "T"}})
    assert load_recipe_data(tmp_path / "same.yaml")["objective"] == {"name": "csd", "w1": "U", "w2": "T"}


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe_data(tmp_path / "a.yaml")


def test_overrides_dotted_yaml_values():
    data = apply_overrides({"objective": "csd", "training": {"steps": 1}},
                           ["training.steps=10", "objective.w1=U", "data.paths=[a, b]", "training.lr=1e-4"])
    assert data["training"] == {"steps": 10, "lr": 1e-4}
    assert data["objective"] == {"name": "csd", "w1": "U"}
    assert data["data"] == {"paths": ["a", "b"]}
    assert apply_overrides(data, ["objective.name=tvd"])["objective"] == {"name": "tvd"}
    with pytest.raises(RecipeError, match="not key=value"):
        apply_overrides({}, ["training.steps"])


def test_validation_gathers_every_error(tmp_path):
    recipe = write(tmp_path / "bad.yaml", {
        "objective": {"name": "csdd"},
        "selector": {"name": "top_fraction", "fraktion": 0.5},
        "training": {"steps": "many"},
        "parallel": {"tensor": 3},
        "student": {"num_attention_heads": 4, "hidden_size": 64},
    })
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    errors = err.value.errors
    text = "\n".join(errors)
    assert "unknown objective 'csdd'" in text and "did you mean 'csd'" in text
    assert "'fraktion'" in text and "fraction" in text
    assert "training.steps" in text and "'many'" in text
    assert "num_attention_heads=4 is not divisible by parallel.tensor=3" in text
    assert len(errors) >= 4


def test_distill_check_prints_all_three_mistakes_and_exits_2(tmp_path, capsys):
    recipe = write(tmp_path / "three.yaml", {
        "objective": {"name": "not_an_objective"},
        "temperature": {"name": "constant", "valu": 2.0},
        "training": {"lr": "fast"},
        "student": {"vocab_size": 100},
        "teacher": {"vocab_size": 100},
    })
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "3 error(s)" in err
    assert "unknown objective 'not_an_objective'" in err
    assert "unknown key 'valu'" in err
    assert "training.lr: expected float, got 'fast'" in err


def test_distill_check_valid_recipe_exits_0(capsys):
    assert main(["check", str(ROOT / "recipes/tiny/csd_tp2.yaml"), "training.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "csd(w1='U', w2='S')" in out and "TP=2" in out


def test_malformed_yaml_and_non_mapping(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "training: [unclosed\n")
    assert main(["check", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listy = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert main(["check", str(listy)]) == 2
    assert "mapping at the top level" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_record_has_recipe_plugins_and_revision(tmp_path):
    recipe, host = load_recipe(ROOT / "recipes/tiny/base.yaml")
    out = write_run_record(recipe, host, tmp_path / "run")
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["objective"] == {"name": "forward_kl"}
    assert resolved["training"]["steps"] == recipe.training.steps
    reloaded, _ = load_recipe(out / "recipe.resolved.yaml")  # the record is itself a runnable recipe
    assert reloaded == recipe
    plugins = json.loads((out / "plugins.json").read_text())
    assert any(p["name"] == "csd" and p["distribution"] == "distill-plugins" for p in plugins["parts"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["git_revision"] and info["versions"]["torch"].startswith("2.")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    recipe, _ = load_recipe(path)
    assert recipe.training.steps > 0


def test_shipped_recipes_exist_in_every_folder():
    folders = {p.parent.name for p in SHIPPED}
    assert "tiny" in folders and len(SHIPPED) >= 3


def test_recipe_key_reference_is_generated_from_the_schema():
    """docs/recipe_keys.md documents every recipe key; regenerate it with the command in its header."""
    from distill_plugins.recipe.docgen import render

    assert (ROOT / "docs" / "recipe_keys.md").read_text() == render(), \
        "docs/recipe_keys.md is stale: python -m distill_plugins.recipe.docgen > docs/recipe_keys.md"


# ---------------------------------------------------------------------------
# Bad input caught at `distill check` (issue 17)
# ---------------------------------------------------------------------------


def test_duplicate_yaml_key_names_file_key_and_both_lines(tmp_path, capsys):
    recipe = write(tmp_path / "dup.yaml", "extends: %s\ntraining:\n  steps: 5\n  lr: 0.1\n  steps: 7\n"
                   % (ROOT / "recipes/tiny/base.yaml"))
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:5: duplicate key 'steps' (first given at line 3)" in err
    nested = write(tmp_path / "flow.yaml", "objective: {name: csd, w1: U, w1: S}\n")
    with pytest.raises(RecipeError, match=r"flow.yaml:1: duplicate key 'w1'"):
        load_recipe_data(nested)
    with pytest.raises(RecipeError, match="duplicate key 'a'"):
        apply_overrides({}, ["data.paths={a: 1, a: 2}"])
    # keys merged in with `<<:` may still be overridden, as YAML intends
    merged = write(tmp_path / "merge.yaml", "base: &b {steps: 1, lr: 2}\ntraining:\n  <<: *b\n  steps: 3\n")
    assert load_recipe_data(merged)["training"] == {"steps": 3, "lr": 2}


def test_empty_recipe_file_says_it_is_empty(tmp_path, capsys):
    for text in ("", "# only a comment\n"):
        empty = write(tmp_path / "empty.yaml", text)
        assert main(["check", str(empty)]) == 2
        assert f"{empty}: the recipe file is empty" in capsys.readouterr().err
    child = write(tmp_path / "child.yaml", {"extends": "empty.yaml", "training": {"steps": 3}})
    with pytest.raises(RecipeError, match="empty.yaml: the recipe file is empty"):
        load_recipe_data(child)


def test_missing_resume_path_fails_check(tmp_path, capsys):
    base = str(ROOT / "recipes/tiny/base.yaml")
    missing = tmp_path / "nope" / "step_3"
    assert main(["check", base, f"checkpoint.resume={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.resume='{missing}': no such checkpoint directory" in err and "`auto`" in err
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="is a file, not a checkpoint directory"):
        load_recipe(base, [f"checkpoint.resume={tmp_path / 'file'}"])
    for ok in ("auto", "none", str(tmp_path)):  # auto needs nothing; an existing directory is checked at run
        assert load_recipe(base, [f"checkpoint.resume={ok}"])[0].checkpoint.resume == ok


@pytest.fixture(scope="module")
def tokenizer_300(tmp_path_factory):
    """A real byte-level BPE with 300 token ids, saved as tokenizers JSON."""
    from distill_plugins.data.tokenizer import train_bpe_tokenizer

    texts = [f"def function_{i}(x): return x * {i} + sum(range({i}))" for i in range(200)]
    tok = train_bpe_tokenizer(texts, 300, min_frequency=1)
    assert tok.vocab_size == 300
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def test_tokenizer_larger_than_model_vocab_fails_check(tmp_path, tokenizer_300, capsys):
    base = str(ROOT / "recipes/tiny/base.yaml")  # student and teacher vocab_size 250
    corpus = write(tmp_path / "c.jsonl", '{"text": "def f(x): return x"}\n')
    data = ["data.kind=jsonl", f"data.paths=[{corpus}]", f"data.tokenizer={tokenizer_300}"]
    assert main(["check", base, *data]) == 2
    err = capsys.readouterr().err
    assert f"data.tokenizer='{tokenizer_300}' has 300 tokens but student.vocab_size=250" in err
    assert "teacher.vocab_size=250" in err and "at least 300" in err
    # large enough models pass; embedded:N is sized without training it
    assert main(["check", base, *data, "student.vocab_size=300", "teacher.vocab_size=300"]) == 0
    with pytest.raises(RecipeError, match=r"data.teacher_tokenizer='embedded:512' has 512 tokens but "
                                          r"teacher.vocab_size=320"):
        load_recipe(base, [*data, "student.vocab_size=300", "teacher.vocab_size=320",
                           "data.teacher_tokenizer=embedded:512", "aligner=eta"])
    # synthetic data reads no tokenizer
    assert load_recipe(base, [f"data.tokenizer={tokenizer_300}"])[0].student.vocab_size == 250


def test_tokenizer_larger_than_model_vocab_fails_at_run(tmp_path, tokenizer_300):
    """A recipe built in Python skips `distill check`: the engine's vocabulary resolution refuses it too."""
    from distill_plugins.engine.run import resolve_vocab_sizes

    recipe, _ = load_recipe(ROOT / "recipes/tiny/base.yaml", ["data.kind=jsonl", f"data.paths=[{tmp_path}]",
                                                              "student.vocab_size=null", "teacher.vocab_size=null",
                                                              f"data.tokenizer={tokenizer_300}"])
    assert resolve_vocab_sizes(recipe) == (300, 300)
    small = dataclasses.replace(recipe, student=dataclasses.replace(recipe.student, vocab_size=256))
    with pytest.raises(RecipeError, match="has 300 tokens but student.vocab_size=256"):
        resolve_vocab_sizes(small)


def test_student_checkpoint_spec_reads_distill_model_json(tmp_path, capsys):
    """`student: {checkpoint: ...}` takes its shape from the distill_model.json beside the weights, like megatron:."""
    from distill_plugins.engine.run import resolve_specs
    from distill_plugins.models.checkpoint_meta import CheckpointMeta, write_meta_file
    from distill_plugins.recipe.schema import ModelSpec

    step = tmp_path / "checkpoints" / "step_4"
    (step / "model_dist").mkdir(parents=True)
    saved = ModelSpec(arch="llama", num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=3,
                      vocab_size=250, max_position_embeddings=64)
    write_meta_file(CheckpointMeta(spec=saved, vocab_size=250, padded_vocab_size=256,
                                   make_vocab_size_divisible_by=16), str(step / "model_dist"))
    recipe, _ = load_recipe(ROOT / "recipes/tiny/base.yaml", [f"student={{checkpoint: {step}}}"])
    student = resolve_specs(recipe).student
    assert (student.num_layers, student.hidden_size, student.num_attention_heads, student.vocab_size) == (3, 48, 6, 250)
    assert student.checkpoint == str(step)
    # `distill check` judges the saved shape, not the recipe's defaults: 6 heads do not split over TP=4
    assert main(["check", str(ROOT / "recipes/tiny/base.yaml"), f"student={{checkpoint: {step}}}",
                 "parallel.tensor=4", "teacher.num_query_groups=4"]) == 2
    assert "student.num_attention_heads=6 is not divisible by parallel.tensor=4" in capsys.readouterr().err


def test_check_gives_the_fused_output_layer_notice_the_run_logs(caplog):
    """``auto`` falling back is a warning at check time (the engine's notice); ``true`` is an error; same rule."""
    recipe = str(ROOT / "recipes" / "tiny" / "eta_cross_tokenizer.yaml")
    with caplog.at_level("WARNING"):
        load_recipe(recipe, ["loss.fused_output_layer=auto"])
    assert "loss.fused_output_layer=auto: the last stage materialises" in caplog.text and "'eta'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_recipe(recipe, ["loss.fused_output_layer=false"])
    assert "fused_output_layer" not in caplog.text
    with pytest.raises(RecipeError, match="loss.fused_output_layer=true but aligner 'eta'"):
        load_recipe(recipe, ["loss.fused_output_layer=true"])
