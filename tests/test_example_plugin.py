"""The documented third-party path: a real pip-installed plugin found through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distill-plugins-example"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> dict[str, str]:
    """pip-install the example into a private target dir (no network, no build isolation)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    env.pop("DISTILL_PLUGINS_NO_ENTRY_POINTS", None)
    return env


def plugins_json(env: dict[str, str]) -> list[dict[str, str]]:
    out = subprocess.run([sys.executable, "-m", "distill_plugins.cli", "plugins", "list", "--json"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_builtins_listed_for_all_five_kinds():
    env = dict(os.environ, DISTILL_PLUGINS_NO_ENTRY_POINTS="1")
    rows = plugins_json(env)
    assert {r["kind"] for r in rows} == {"objective", "token_selector", "temperature_policy", "vocab_aligner",
                                         "sequence_source"}
    assert all(set(r) >= {"kind", "name", "plugin", "distribution"} for r in rows)
    assert all(r["distribution"] == "distill-plugins" for r in rows)


def test_installed_example_parts_are_listed_under_its_distribution(installed_example):
    rows = plugins_json(installed_example)
    mine = {(r["kind"], r["name"]) for r in rows if r["distribution"] == "distill-plugins-example"}
    assert mine == {("objective", "squared_hellinger"), ("token_selector", "teacher_confident")}
    assert {r["plugin"] for r in rows if r["distribution"] == "distill-plugins-example"} == {"example"}


def test_entry_points_switch_off(installed_example):
    env = dict(installed_example, DISTILL_PLUGINS_NO_ENTRY_POINTS="1")
    assert not any(r["distribution"] == "distill-plugins-example" for r in plugins_json(env))


def test_example_objective_passes_the_contract_check(installed_example, monkeypatch):
    """The contract checker shipped for plugin authors accepts the example (TP=1 and TP=2 included)."""
    code = ("from distill_plugins_example import SquaredHellinger\n"
            "from distill_plugins.testing.contracts import check_objective_contract\n"
            "check_objective_contract(SquaredHellinger)\nprint('contract ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env=installed_example, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "contract ok" in out.stdout
