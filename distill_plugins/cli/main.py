"""The ``distill`` command.

Subcommands::

    distill plugins list [--json]           registered parts of every kind
    distill plugins show NAME [--kind K]     a part's parameters and docs
    distill check RECIPE [key=value ...]     validate; exit 0 when valid, 2 with every error
    distill run RECIPE [key=value ...] [--cpu]
                                             train (inside torchrun on clusters)
    distill data prepare ...                 tokenize text into megatron indexed datasets
    distill plan RECIPE --nodes N --gpus-per-node G
                                             divisibility and per-GPU memory estimate
    distill export CHECKPOINT OUT_DIR        a trained student to a Hugging Face directory
    distill eval RECIPE --checkpoint PATH    response CE, KL to the teacher, ROUGE-L of greedy answers (or --model hf:DIR)
    distill demo [--quick]                   the embedded default: corpus, tokenizer, teacher, three students

Exit codes: 0 success, 1 unexpected failure, 2 bad input (recipe, plugin, data).
docs/cli.md documents every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import warnings
from typing import Optional, Sequence

from distill_plugins.cli import data as data_cli
from distill_plugins.cli import demo as demo_cli
from distill_plugins.cli import eval as eval_cli
from distill_plugins.cli import export as export_cli
from distill_plugins.cli import plan as plan_cli
from distill_plugins.cli.args import IntermixedParser
from distill_plugins.config import field_docs, type_name
from distill_plugins.engine.signals import install_stop_handlers
from distill_plugins.errors import DistillError
from distill_plugins.logging import configure_logging
from distill_plugins.manager import build_plugin_host
from distill_plugins.recipe.load import load_recipe
from distill_plugins.recipe.record import plugin_table
from distill_plugins.recipe.summary import describe_recipe

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


# ---------------------------------------------------------------------------
# plugins
# ---------------------------------------------------------------------------


def _cmd_plugins_list(args: argparse.Namespace) -> int:
    host = build_plugin_host(args.plugin)
    rows = plugin_table(host)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _print_table(rows, ["kind", "name", "plugin", "distribution", "version"])
    return EXIT_OK


def _cmd_plugins_show(args: argparse.Namespace) -> int:
    host = build_plugin_host(args.plugin)
    kinds = [args.kind] if args.kind else sorted(host.registries)
    found = [host.registry(k).get(args.name) for k in kinds if args.name in host.registry(k)]
    if not found:
        known = sorted({n for k in kinds for n in host.names(k)})
        raise DistillError(f"no part named {args.name!r}; registered: {', '.join(known)}")
    for entry in found:
        doc = (entry.cls.__doc__ or "").strip()
        print(f"{entry.kind} {entry.name!r} from {entry.owner}\n")
        if doc:
            print(doc + "\n")
        config = entry.cls.Config
        hints = {f.name: f for f in dataclasses.fields(config)}
        helps = field_docs(config)
        rows = []
        for name, f in hints.items():
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            rows.append({"parameter": name, "type": type_name(_hint(config, name)), "default": repr(default),
                         "meaning": helps.get(name, "")})
        if rows:
            _print_table(rows, ["parameter", "type", "default", "meaning"])
        else:
            print("(no parameters)")
    return EXIT_OK


def _hint(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


# ---------------------------------------------------------------------------
# check / run
# ---------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    recipe, host = load_recipe(args.recipe, args.overrides)
    for line in describe_recipe(recipe, host):
        print(line)
    print(f"OK: {args.recipe} is valid")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    install_stop_handlers()  # before the slow start-up: a SIGUSR1/SIGTERM from now on ends the run cleanly
    overrides = list(args.overrides)
    if args.cpu:
        overrides.append("device=cpu")
    recipe, host = load_recipe(args.recipe, overrides)
    # megatron is imported here, after the stop handlers are in place (its import takes seconds)
    from distill_plugins.engine.run import run

    return run(recipe, host, cpu=recipe.device == "cpu")


# ---------------------------------------------------------------------------
# wiring
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)

    plugins = sub.add_parser("plugins", help="list or describe registered parts")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", required=True)
    p_list = plugins_sub.add_parser("list", help="table of registered parts of every kind")
    p_list.add_argument("--json", action="store_true", help="print a JSON list of {kind, name, plugin, distribution, version}")
    p_list.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module")
    p_list.set_defaults(func=_cmd_plugins_list)
    p_show = plugins_sub.add_parser("show", help="a part's parameters")
    p_show.add_argument("name")
    p_show.add_argument("--kind", choices=["objective", "token_selector", "temperature_policy", "vocab_aligner",
                                            "sequence_source"])
    p_show.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p_show.set_defaults(func=_cmd_plugins_show)

    check = sub.add_parser("check", help="validate a recipe without running it")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.set_defaults(func=_cmd_check)

    run = sub.add_parser("run", help="run a recipe (under torchrun for several processes)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("--cpu", action="store_true", help="dry run on CPU with gloo (same as device=cpu)")
    run.set_defaults(func=_cmd_run)

    for command in (data_cli, plan_cli, demo_cli, export_cli, eval_cli):
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # megatron-core warns at import when the GPU-only extras are absent; on CPU that is expected
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
