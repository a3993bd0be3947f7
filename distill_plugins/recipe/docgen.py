"""Generate the recipe-key reference (docs/recipe_keys.md) from the schema's field docs.

``python -m distill_plugins.recipe.docgen > docs/recipe_keys.md``; a test checks
the committed file equals this output, so the reference cannot drift.
"""

from __future__ import annotations

import dataclasses
import typing

from ..config import type_name
from .schema import PART_SECTIONS, Recipe


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            if set(f.name for f in dataclasses.fields(value)) == {"name", "params"}:
                return repr(value.name)
            return "(section)"
        return repr(value)
    return "(required)"


def _section_type(tp):
    for arg in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render() -> str:
    lines = ["# Recipe keys", "",
             "Generated from `distill_plugins/recipe/schema.py` by `python -m distill_plugins.recipe.docgen`;",
             "do not edit by hand. docs/recipes.md explains how recipes are layered and validated.", ""]
    hints = typing.get_type_hints(Recipe)
    top_rows, sections = [], []
    for f in dataclasses.fields(Recipe):
        section = _section_type(hints[f.name])
        if f.name in PART_SECTIONS:
            top_rows.append((f.name, "part name or {name: ..., <params>}", _default(f), f.metadata.get("help", "")))
        elif section is not None:
            top_rows.append((f.name, "section", "", f.metadata.get("help", "")))
            sections.append((f.name, section))
        else:
            top_rows.append((f.name, _cell(type_name(hints[f.name])), _default(f), f.metadata.get("help", "")))
    lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {h} |" if d else f"| `{k}` | {t} | | {h} |" for k, t, d, h in top_rows]
    seen = set()
    for name, cls in sections:
        if cls in seen:
            lines += ["", f"## `{name}`", "", f"Same keys as `{[n for n, c in sections if c is cls][0]}`."]
            continue
        seen.add(cls)
        sub_hints = typing.get_type_hints(cls)
        lines += ["", f"## `{name}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            lines.append(f"| `{name}.{f.name}` | {_cell(type_name(sub_hints[f.name]))} | `{_default(f)}` | "
                         f"{f.metadata.get('help', '')} |")
    lines += ["", "## Part sections", "",
              "`objective`, `selector`, `temperature` and `aligner` take a registered name, alone or with "
              "that part's parameters: `objective: {name: csd, w1: U, w2: S}`. Each part's parameters are "
              "listed in its own page (docs/objectives.md, docs/selectors.md, docs/temperature.md, "
              "docs/aligners.md) and by `distill plugins show NAME`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
