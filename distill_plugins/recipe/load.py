"""Reading recipes: YAML, ``extends:``, command-line overrides, then validation.

Three layers, later ones winning:

1. the base recipes named by ``extends:`` (a path relative to the recipe that
   names it; chains allowed, cycles rejected);
2. the recipe file itself, deep-merged over its base (mappings merge key by key;
   a part section whose ``name`` changes replaces the base's section whole, so a
   base's CSD parameters never leak into a child's forward KL);
3. ``key=value`` overrides from the command line: dotted keys, values parsed as
   YAML (``training.steps=10``, ``objective.w1=U``, ``data.paths=[a,b]``).

Validation (:mod:`distill_plugins.recipe.validate`) gathers every error into one
:class:`~distill_plugins.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from ..errors import RecipeError
from .schema import PART_SECTIONS, normalize_part
from .validate import validate_recipe_data


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"line {line}: duplicate key {key!r} (first given at line {first_line}); "
                         "a mapping names each key once: delete one of them")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` (no dot) as a float, as users expect, and refuses duplicate keys.

    PyYAML keeps the last of two equal keys in a mapping without a word, so a
    recipe that sets ``lr:`` twice trains with whichever came last; here that is
    a :class:`DuplicateKeyError` naming the key and both lines. Keys merged in
    with ``<<:`` may be overridden by the mapping's own keys, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML text to Python data with :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}:{exc.line}: duplicate key {exc.key!r} (first given at line {exc.first_line}); "
                          "YAML would keep only the last value: delete one of them") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise RecipeError(f"{path}: the recipe file is empty (or only comments); write the sections that differ "
                          "from the defaults, e.g. `extends: base.yaml` and `training: {steps: 10}` (docs/recipes.md)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``; see the module docstring for the part-section rule."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if key in PART_SECTIONS:
            value = normalize_part(value)
            old = normalize_part(out.get(key))
            if isinstance(old, dict) and isinstance(value, dict) and old.get("name") == value.get("name", old.get("name")):
                merged = dict(old)
                merged.update(value)
                out[key] = merged
            else:
                out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe_file(path: str | os.PathLike, _seen: Optional[list[Path]] = None) -> dict[str, Any]:
    """The recipe at ``path`` with its ``extends:`` chain merged in (``extends`` removed)."""
    path = Path(path).resolve()
    seen = list(_seen or [])
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + [path])
        raise RecipeError(f"recipe extends itself: {chain}")
    data = _read_yaml(path)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise RecipeError(f"{path}: extends must be a path string, got {base_ref!r}")
    base = read_recipe_file(path.parent / base_ref, seen + [path])
    return deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a copy of ``data``."""
    out = copy.deepcopy(data)
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r} is not key=value (e.g. training.steps=10)")
            continue
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            errors.append(f"override {item!r}: value is not valid YAML: {exc}")
            continue
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if part in PART_SECTIONS and depth == 0:
                node[part] = normalize_part(node.get(part, {}))
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a mapping")
                break
            node = child
        else:
            last = parts[-1]
            if len(parts) == 2 and parts[0] in PART_SECTIONS and last == "name" and node.get("name") != value:
                node.clear()  # a different part: drop the old part's parameters
            node[last] = value
    if errors:
        raise RecipeError(errors)
    return out


def load_recipe_data(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The merged, overridden recipe as plain data (not yet validated)."""
    return apply_overrides(read_recipe_file(path), overrides)


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), host=None):
    """Read, merge, override and validate a recipe.

    Args:
        path: the recipe YAML.
        overrides: ``key=value`` strings.
        host: a :class:`~distill_plugins.manager.PluginHost`; built from the
            recipe's ``plugins:`` list when omitted.

    Returns:
        ``(recipe, host)``: the validated :class:`~distill_plugins.recipe.schema.Recipe`
        and the plugin host used to check its parts.

    Raises:
        RecipeError: listing every problem found.
    """
    data = load_recipe_data(path, overrides)
    return validate_recipe_data(data, host=host, source=str(path))
