"""``distill plan RECIPE --nodes N --gpus-per-node G [--gpu-memory-gb M] [key=value ...]``.

Checks the recipe's parallel layout against the allocation (divisibility of heads,
query groups, layers, batch; vocabulary padding), prints the per-GPU memory
estimate line by line (docs/planner.md), suggests a layout that fits when the
recipe's does not, and prints the sbatch command to run.

Exit codes: 0 the layout is valid and fits; 2 it is refused or over memory (or the
recipe is invalid). The report goes to stdout either way.
"""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_REFUSED = 0, 2


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts ``key=value`` overrides after the options (``plan R --nodes 2 k=v``).

    Plain argparse stops filling a ``nargs="*"`` positional at the first option, so
    the subcommand parses intermixed (positionals and options in any order).
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


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
    parser.__class__ = _IntermixedParser
    return parser


def run_plan(args: argparse.Namespace) -> int:
    """Handler: print the report; 0 when valid and fitting, 2 otherwise."""
    from distill_plugins.plan import plan_recipe

    report = plan_recipe(args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         gpu_memory_gb=args.gpu_memory_gb, overrides=args.overrides,
                         flash_attention=args.attention == "flash")
    print(report.format())
    return EXIT_OK if report.ok else EXIT_REFUSED
