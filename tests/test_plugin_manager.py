"""The plugin manager: load order, entry points, error messages, registries."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import textwrap
from types import SimpleNamespace

import pytest

from distill_plugins import build_objective, build_plugin_host
from distill_plugins.errors import PluginError, RecipeError, UnknownPartError
from distill_plugins.manager import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, NO_ENTRY_POINTS_ENV

KINDS = ("objective", "token_selector", "temperature_policy", "vocab_aligner")

PLUGIN_SOURCE = '''
from dataclasses import dataclass, field
import torch
from distill_plugins import Objective, PartConfig, hookimpl

class Zero(Objective):
    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        scale: float = field(default=1.0, metadata={"help": "factor"})

    def __call__(self, s, t, *, temperature=1.0, tp_group=None, vocab_size=None):
        return self.config.scale * (s.float() - s.float().detach()).sum(-1)

@hookimpl
def distill_register_objectives(register):
    register("{name}", Zero)
'''


def write_plugin(tmp_path, monkeypatch, module: str, source: str) -> str:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module


def install_entry_point(monkeypatch, name: str, module: str, distribution: str, version: str) -> None:
    """Make ``module`` the only ``distill_plugins`` entry point, from a fake distribution, and switch discovery on."""
    fake_dist = SimpleNamespace(name=distribution, version=version)
    ep = metadata.EntryPoint(name=name, value=module, group=ENTRY_POINT_GROUP)
    ep = ep._for(fake_dist) if hasattr(ep, "_for") else ep
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == ENTRY_POINT_GROUP else [])
    monkeypatch.delenv(NO_ENTRY_POINTS_ENV)


@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")


def test_builtins_register_every_kind():
    host = build_plugin_host()
    for kind in KINDS:
        assert host.names(kind), f"no built-in {kind}"
    owners = {e.plugin for e in host.entries()}
    assert owners <= set(DEFAULT_PLUGINS)
    assert {e.distribution for e in host.entries()} == {"distill-plugins"}


def test_builtin_objectives_and_names_required_by_the_spec():
    host = build_plugin_host()
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "logit_mse", "csd", "taid"):
        assert name in host.registry("objective"), name
    for name in ("all", "top_fraction", "random_fraction", "latf", "adaspec"):
        assert name in host.registry("token_selector"), name
    for name in ("constant", "schedule", "idts"):
        assert name in host.registry("temperature_policy"), name
    for name in ("identity", "eta", "dskd"):
        assert name in host.registry("vocab_aligner"), name


def test_recipe_plugin_is_loaded_after_builtins(tmp_path, monkeypatch):
    module = write_plugin(tmp_path, monkeypatch, "plug_zero", PLUGIN_SOURCE.replace("{name}", "zero"))
    host = build_plugin_host([module])
    entry = host.registry("objective").get("zero")
    assert entry.plugin == "plug_zero"
    assert [p.source for p in host.plugins][-1] == "recipe"
    assert host.plugins[0].name == DEFAULT_PLUGINS[0]


def test_duplicate_name_names_both_owners(tmp_path, monkeypatch):
    module = write_plugin(tmp_path, monkeypatch, "plug_dup", PLUGIN_SOURCE.replace("{name}", "forward_kl"))
    with pytest.raises(PluginError) as err:
        build_plugin_host([module])
    message = str(err.value)
    assert "forward_kl" in message and "distill_plugins.builtin.objectives" in message and "plug_dup" in message


def test_unknown_name_lists_known_and_closest():
    host = build_plugin_host()
    with pytest.raises(UnknownPartError) as err:
        host.build("objective", "forwrd_kl")
    message = str(err.value)
    assert "did you mean 'forward_kl'" in message
    assert "csd" in message and "reverse_kl" in message


def test_bad_params_name_part_key_and_valid_keys():
    with pytest.raises(RecipeError) as err:
        build_objective("csd", w3="U")
    message = str(err.value)
    assert "csd" in message and "'w3'" in message and "w1" in message and "w2" in message
    with pytest.raises(RecipeError) as err:
        build_objective("jsd", beta="half")
    assert "beta" in str(err.value) and "'half'" in str(err.value)


def test_plugin_import_failure_names_plugin_and_distribution(tmp_path, monkeypatch):
    broken = write_plugin(tmp_path, monkeypatch, "plug_broken", "import not_a_real_module_xyz\n")
    install_entry_point(monkeypatch, "broken", broken, "distill-plugins-broken", "0.3")
    with pytest.raises(PluginError) as err:
        build_plugin_host()
    message = str(err.value)
    assert "plugin 'broken' (distill-plugins-broken 0.3) failed to import" in message
    assert isinstance(err.value.__cause__, ModuleNotFoundError)


def test_entry_point_plugin_with_fake_distribution(tmp_path, monkeypatch):
    module = write_plugin(tmp_path, monkeypatch, "plug_ep", PLUGIN_SOURCE.replace("{name}", "ep_zero"))
    install_entry_point(monkeypatch, "ep", module, "distill-plugins-ep", "1.2")
    entry = build_plugin_host().registry("objective").get("ep_zero")
    assert (entry.plugin, entry.distribution, entry.version) == ("ep", "distill-plugins-ep", "1.2")
    # the environment variable switches entry points off
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")
    assert "ep_zero" not in build_plugin_host().registry("objective")
    # and DISTILL_PLUGINS_DISABLE skips a single plugin
    monkeypatch.delenv(NO_ENTRY_POINTS_ENV)
    monkeypatch.setenv("DISTILL_PLUGINS_DISABLE", "ep")
    assert "ep_zero" not in build_plugin_host().registry("objective")


def test_misspelled_hook_is_rejected(tmp_path, monkeypatch):
    source = "from distill_plugins import hookimpl\n@hookimpl\ndef distill_register_objective(register):\n    pass\n"
    module = write_plugin(tmp_path, monkeypatch, "plug_typo", source)
    with pytest.raises(PluginError) as err:
        build_plugin_host([module])
    assert "distill_register_objective" in str(err.value)


def test_wrong_base_class_is_rejected(tmp_path, monkeypatch):
    source = ("from distill_plugins import hookimpl\nclass NotAPart: pass\n"
              "@hookimpl\ndef distill_register_token_selectors(register):\n    register('odd', NotAPart)\n")
    module = write_plugin(tmp_path, monkeypatch, "plug_odd", source)
    with pytest.raises(PluginError) as err:
        build_plugin_host([module])
    assert "TokenSelector" in str(err.value) and "plug_odd" in str(err.value)


def test_impl_may_take_fewer_arguments_than_spec(tmp_path, monkeypatch):
    source = ("from distill_plugins import hookimpl\nseen = []\n"
              "@hookimpl\ndef distill_on_step_end(step):\n    seen.append(step)\n"
              "@hookimpl\ndef distill_validate_recipe():\n    return ['always unhappy']\n")
    module = write_plugin(tmp_path, monkeypatch, "plug_few", source)
    host = build_plugin_host([module])
    host.on_step_end(3, {"loss": 1.0})
    assert __import__(module).seen == [3]
    assert host.validate_recipe({}) == ["always unhappy"]


def test_no_global_state_between_hosts(tmp_path, monkeypatch):
    module = write_plugin(tmp_path, monkeypatch, "plug_once", PLUGIN_SOURCE.replace("{name}", "once"))
    assert "once" in build_plugin_host([module]).registry("objective")
    assert "once" not in build_plugin_host().registry("objective")


def test_build_objective_returns_callable_of_the_contract():
    import torch

    objective = build_objective("forward_kl")
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    out = objective(s, t, temperature=1.0, tp_group=None, vocab_size=9)
    assert out.shape == (4,) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.all(s.grad[:, 9] == 0)


BAD_CONFIG_SOURCE = '''
from dataclasses import dataclass, field
from typing import Literal
from distill_plugins import PartConfig, TemperaturePolicy, hookimpl

class Hot(TemperaturePolicy):
{config}
    def temperatures(self, ctx, selection):
        return 2.0

@hookimpl
def distill_register_temperature_policies(register):
    register("hot", Hot)
'''

BAD_CONFIGS = {
    "undecorated": ("    class Config(PartConfig):\n        value: float = 2.0\n",
                    "Config Hot.Config is not a dataclass; decorate it with @dataclass(frozen=True, kw_only=True)"),
    "wrong_type": ("    @dataclass(frozen=True, kw_only=True)\n    class Config(PartConfig):\n"
                   "        value: float = 'hot'\n",
                   "invalid default value(s): Config Hot.Config default.value: expected float, got 'hot' (str)"),
    "not_a_choice": ("    @dataclass(frozen=True, kw_only=True)\n    class Config(PartConfig):\n"
                     "        shape: Literal['linear', 'cosine'] = 'cubic'\n",
                     "default.shape: 'cubic' is not one of ['linear', 'cosine']"),
    "fails_own_check": ("    @dataclass(frozen=True, kw_only=True)\n    class Config(PartConfig):\n"
                        "        value: float = -1.0\n"
                        "        def __post_init__(self):\n"
                        "            if self.value <= 0: raise ValueError(f'value={self.value} must be > 0')\n",
                        "value=-1.0 must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_registration_rejects_a_config_that_is_no_dataclass_or_has_ill_typed_defaults(tmp_path, monkeypatch, case):
    config, message = BAD_CONFIGS[case]
    module = write_plugin(tmp_path, monkeypatch, f"plug_cfg_{case}", BAD_CONFIG_SOURCE.format(config=config))
    with pytest.raises(PluginError) as err:
        build_plugin_host([module])
    text = str(err.value)
    assert f"plugin 'plug_cfg_{case}'" in text and "temperature_policy 'hot'" in text and message in text


def test_required_config_fields_are_allowed(tmp_path, monkeypatch):
    config = ("    @dataclass(frozen=True, kw_only=True)\n    class Config(PartConfig):\n"
              "        value: float\n        shape: str = 'linear'\n")
    module = write_plugin(tmp_path, monkeypatch, "plug_cfg_required", BAD_CONFIG_SOURCE.format(config=config))
    host = build_plugin_host([module])
    assert host.build("temperature_policy", "hot", {"value": 3.0}).config.value == 3.0
