"""The cluster recipes: names, headers, and ``distill check`` without the model weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distill_plugins.cli import main
from distill_plugins.manager import NO_ENTRY_POINTS_ENV
from distill_plugins.recipe.load import load_recipe_data

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = sorted((ROOT / "recipes/cluster").glob("*.yaml"))
#: layout tp<T>pp<P>-<nodes>x<gpus>; a teacher on its own ranks adds t<ranks>tp<T>pp<P>- in front
NAME = re.compile(r"^[a-z0-9.\-]+-to-[a-z0-9.\-]+_[a-z0-9\-]+_(t\d+tp\d+pp\d+-)?tp\d+pp\d+-\d+x\d+\.yaml$")
#: recipes `distill check` rejects today for a reason outside the recipe (see the reason)



@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")


def test_the_five_cluster_recipes_are_there_and_named_by_convention():
    names = [p.name for p in CLUSTER]
    assert len(names) == 5
    for name in names:
        assert NAME.match(name), f"{name} is not <teacher>-to-<student>_<objective>_<layout>.yaml"
    data = {p.name: load_recipe_data(p) for p in CLUSTER}
    by_part = {n: (d["objective"], d.get("selector"), d.get("temperature"), d.get("aligner"), d["data"]["kind"])
               for n, d in data.items()}
    assert any(obj == {"name": "csd", "w1": "S", "w2": "S"} for obj, *_ in by_part.values())
    assert any(sel["name"] == "latf" and temp["name"] == "idts" for _, sel, temp, *_ in by_part.values()
               if isinstance(sel, dict) and isinstance(temp, dict))
    assert any(isinstance(al, dict) and al["name"] == "dskd" for *_, al, _ in by_part.values())
    blends = [d["data"] for d in data.values() if d["data"]["kind"] == "indexed"]
    assert blends and len(blends[0]["paths"]) == len(blends[0]["weights"]) >= 2


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_recipe_header_gives_the_launch_command_and_shapes(path):
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert header.startswith("# ")
    assert f"launch/slurm/distill.sbatch {path.relative_to(ROOT)}" in header
    data = load_recipe_data(path)
    for role in ("student", "teacher"):
        spec = data[role]
        assert spec["hf"], "models are local HF directories"
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size"):
            assert key in spec, f"{role}.{key} must be in the recipe so check/plan work without weights"
    assert data["checkpoint"]["resume"] == "auto" and data["device"] == "cuda"


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_recipe_passes_distill_check_without_weights(path, capsys):
    code = main(["check", str(path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "OK" in captured.out
    assert "not found; using the shape keys from the recipe" in captured.err  # absent weights: a warning
