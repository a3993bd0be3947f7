"""One test per hook spec, plus the meta-test that keeps specs, tests and docs in step."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

from distill_plugins import build_plugin_host, hookspecs
from distill_plugins.manager import NO_ENTRY_POINTS_ENV

ROOT = Path(__file__).resolve().parents[1]


def hook_specs() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items()
            if name.startswith("distill_") and callable(fn) and hasattr(fn, "distill_plugins_spec")}


def signature_title(name: str, fn) -> str:
    return f"{name}({', '.join(inspect.signature(fn).parameters)})"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")

    def make(source: str, name: str = "hook_probe"):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return build_plugin_host([name]), __import__(name)

    return make


PART = """
from dataclasses import dataclass
from distill_plugins import hookimpl, PartConfig, {base}

class Probe({base}):
    pass

@hookimpl
def {hook}(register):
    register("probe_part", Probe)
"""


@pytest.mark.parametrize("hook, base, kind", [
    ("distill_register_objectives", "Objective", "objective"),
    ("distill_register_token_selectors", "TokenSelector", "token_selector"),
    ("distill_register_temperature_policies", "TemperaturePolicy", "temperature_policy"),
    ("distill_register_vocab_aligners", "VocabAligner", "vocab_aligner"),
])
def test_registration_hooks(plugin, hook, base, kind):
    host, _ = plugin(PART.format(base=base, hook=hook))
    entry = host.registry(kind).get("probe_part")
    assert entry.plugin == "hook_probe" and entry.cls.__name__ == "Probe"
    assert host.build(kind, "probe_part").name == "probe_part"
    for other in {"objective", "token_selector", "temperature_policy", "vocab_aligner"} - {kind}:
        assert "probe_part" not in host.registry(other)


def test_distill_validate_recipe_collects_from_every_plugin(plugin):
    host, _ = plugin("""
        from distill_plugins import hookimpl
        @hookimpl
        def distill_validate_recipe(recipe):
            return [f"steps={recipe['training']['steps']} is odd"] if recipe["training"]["steps"] % 2 else []
    """)
    assert host.validate_recipe({"training": {"steps": 3}}) == ["steps=3 is odd"]
    assert host.validate_recipe({"training": {"steps": 4}}) == []


def test_distill_on_step_end_sees_step_and_metrics(plugin):
    host, module = plugin("""
        from distill_plugins import hookimpl
        calls = []
        @hookimpl
        def distill_on_step_end(step, metrics):
            calls.append((step, dict(metrics)))
    """)
    host.on_step_end(7, {"loss": 0.5})
    assert module.calls == [(7, {"loss": 0.5})]


def test_every_hook_spec_has_a_test_and_a_doc_section():
    specs = hook_specs()
    assert len(specs) >= 6
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_hooks.py")
    tests_text += inspect.getsource(test_registration_hooks) + inspect.getsource(test_distill_validate_recipe_collects_from_every_plugin) \
        + inspect.getsource(test_distill_on_step_end_sees_step_and_metrics)
    doc = (ROOT / "docs" / "plugin_hooks.md").read_text()
    titles = set(re.findall(r"^#+\s+`?([^`\n]+?)`?\s*$", doc, flags=re.M))
    for name, fn in specs.items():
        assert name in tests_text, f"hook {name} has no test"
        assert signature_title(name, fn) in titles, f"docs/plugin_hooks.md lacks a section titled {signature_title(name, fn)}"
        assert fn.__doc__ and "Returns" in fn.__doc__, f"hook {name} is not documented"


def test_distill_validate_recipe_sees_checked_part_params_and_plugin_errors_name_the_plugin(plugin, capsys):
    """Part sections arrive as {'name', 'params'} with every Config field; bad params stop the hook; a raise names the plugin."""
    from distill_plugins.cli import main
    from distill_plugins.errors import RecipeError
    from distill_plugins.recipe.load import load_recipe

    host, module = plugin("""
        from distill_plugins import hookimpl
        seen = []
        @hookimpl
        def distill_validate_recipe(recipe):
            seen.append(recipe)
            if recipe["objective"]["params"]["w1"] == "T":
                raise KeyError("w1")
            return "a bare string is one error"
    """, name="validate_probe")
    base = ROOT / "recipes/tiny/base.yaml"
    with pytest.raises(RecipeError) as err:
        load_recipe(base, ["objective=csd", "objective.w1=U"], host=host)
    assert err.value.errors == ["a bare string is one error"]
    view = module.seen[-1]
    assert view["objective"] == {"name": "csd", "params": {"w1": "U", "w2": "S", "weight_temperature": 1.0}}  # defaults
    assert view["temperature"] == {"name": "constant", "params": {"value": 1.0, "scale_loss_by_tau_squared": False}}
    assert view["aligner"]["name"] == "identity"  # `auto` already resolved
    calls = len(module.seen)
    with pytest.raises(RecipeError) as err:  # the part's own check fails: the hook never sees the bad value
        load_recipe(base, ["objective=csd", "objective.w1=nonsense"], host=host)
    assert len(module.seen) == calls and err.value.errors == ["objective 'csd'.w1: 'nonsense' is not one of ['U', 'S', 'T']"]
    with pytest.raises(RecipeError) as err:
        load_recipe(base, ["objective=csd", "objective.w1=T"], host=host)
    assert err.value.errors == ["plugin 'validate_probe' raised KeyError in distill_validate_recipe: 'w1'"]
    # through the CLI: exit 2, no traceback
    recipe = ROOT / "recipes/tiny/base.yaml"
    assert main(["check", str(recipe), "plugins=[validate_probe]", "objective=csd", "objective.w1=T"]) == 2
    out = capsys.readouterr().err
    assert "plugin 'validate_probe' raised KeyError" in out and "Traceback" not in out
