"""What a run writes about itself: the resolved recipe, the plugins, the code revision.

``write_run_record(recipe, host, output_dir)`` writes, on the calling rank only
(the engine calls it on global rank 0):

* ``recipe.resolved.yaml``: the recipe after ``extends:``, overrides and defaults;
* ``plugins.json``: every loaded plugin and registered part with distributions
  and versions (like pytest's ``plugins:`` header line);
* ``run_info.json``: git revision of the checkout (when run from one), package
  versions of distill-plugins, torch and megatron-core, and the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .schema import recipe_data


def git_revision(path: str | Path = ".") -> str:
    """``git describe --always --dirty`` of the checkout at ``path``, or ``"unknown"``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=path,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def plugin_table(host) -> list[dict[str, str]]:
    """One row per registered part: kind, name, plugin, distribution, version."""
    return [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "distribution": e.distribution,
             "version": e.version} for e in host.entries()]


def write_run_record(recipe, host, output_dir: str | Path) -> Path:
    """Write the run record into ``output_dir`` (created if needed) and return that path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe_data(recipe), sort_keys=False))
    plugins = {"plugins": [p.__dict__ for p in host.plugins], "parts": plugin_table(host)}
    (out / "plugins.json").write_text(json.dumps(plugins, indent=2) + "\n")
    package_dir = Path(__file__).resolve().parents[2]
    info = {
        "git_revision": git_revision(package_dir),
        "versions": {d: _version(d) for d in ("distill-plugins", "torch", "megatron-core", "pluggy")},
        "argv": sys.argv,
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
