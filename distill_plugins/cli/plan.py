"""``distill plan RECIPE --nodes N --gpus-per-node G [--gpu-memory-gb M] [key=value ...]``.

Checks the recipe's parallel layout against the allocation (divisibility of heads,
query groups, layers, batch; vocabulary padding), prints the per-GPU memory
estimate line by line (docs/planner.md), suggests a layout that fits when the
recipe's does not, and prints the sbatch command to run.

Exit codes: 0 the layout is valid and fits; 2 it is refused or over memory (or the
recipe is invalid). The report goes to stdout either way.

Loading for planning (:func:`load_for_plan`) checks the schema only, not the
parts' registration: a recipe naming a plugin installed on the cluster only can
be planned on a laptop. The arithmetic is :mod:`distill_plugins.plan`'s.

Usage::

    report = plan_recipe("recipes/cluster/x.yaml", nodes=2, gpus_per_node=8)
    print(report.format())
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from distill_plugins.errors import RecipeError
from distill_plugins.plan import PlanReport, plan
from distill_plugins.plan_separate import plan_separate
from distill_plugins.recipe.load import load_recipe_data
from distill_plugins.recipe.schema import Recipe, parse_recipe, split_parts

EXIT_OK, EXIT_REFUSED = 0, 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``distill``'s subparsers."""
    parser = subparsers.add_parser(
        "plan", help="check a recipe's layout against a cluster and estimate per-GPU memory",
        description="Divisibility checks and a per-GPU memory estimate (docs/planner.md); "
                    "prints the sbatch command to run.")
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for distill run")
    parser.add_argument("--nodes", type=int, required=True, help="nodes in the allocation")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80, an H100 80GB)")
    parser.add_argument("--attention", choices=["flash", "unfused"], default="flash",
                        help="flash (fused attention: no stored score matrix; the default with Transformer "
                             "Engine) or unfused (adds 5*a*s^2*b bytes per layer)")
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    """Handler: print the report; 0 when valid and fitting, 2 otherwise."""
    report = plan_recipe(args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         gpu_memory_gb=args.gpu_memory_gb, overrides=args.overrides,
                         flash_attention=args.attention == "flash")
    print(report.format())
    return EXIT_OK if report.ok else EXIT_REFUSED


def load_for_plan(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read ``path`` with ``overrides`` and check it against the schema, for planning.

    Only the schema is checked (types, ranges, unknown keys), not the parts'
    registration or parameters: a recipe naming a plugin that is installed on the
    cluster only can still be planned on a laptop (``distill check`` validates the
    rest). The layout's divisibility is the planner's own check, so a layout that
    does not divide is reported with a suggestion instead of a bare error.

    Raises:
        RecipeError: every schema error, one line each.
    """
    errors: list[str] = []
    recipe, schema_errors = parse_recipe(split_parts(load_recipe_data(path, overrides), errors))
    errors.extend(schema_errors)
    if errors:
        raise RecipeError(errors)
    return recipe


def plan_recipe(path: str | os.PathLike, *, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0,
                overrides: Sequence[str] = (), flash_attention: bool = True) -> PlanReport:
    """:func:`load_for_plan` then :func:`distill_plugins.plan.plan`."""
    recipe = load_for_plan(path, overrides)
    planner = plan if recipe.teacher_parallel is None else plan_separate  # a teacher on its own ranks
    return planner(recipe, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory_gb,
                recipe_path=str(path), overrides=overrides, flash_attention=flash_attention)
