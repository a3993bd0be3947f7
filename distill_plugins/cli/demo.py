"""``distill demo``: the embedded-default distillation on this machine (docs/demo.md).

Wired into :mod:`distill_plugins.cli` through :func:`add_parser`::

    distill demo                      # full docstring demo (about 7 minutes on 2 CPU cores)
    distill demo --quick              # a few steps of everything (a smoke test, numbers meaningless)
    distill demo --steps 200 --output runs/my_demo
    distill demo --task instruct      # instruction demo: SFT teacher, response-only students, ROUGE-L

The table goes to stdout; progress (stage lines with timings, the engine's
per-step lines) to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill_plugins.demo.pipeline import TASKS, DemoSettings, default_recipes_dir, instruct_verdict, run_demo, verdict
from distill_plugins.errors import DistillError

#: ``--quick``: steps of the teacher and of each student, and held-out windows (instruct: examples) scored.
QUICK_TEACHER_STEPS = 40
QUICK_STUDENT_STEPS = 10
QUICK_EVAL_WINDOWS = 16

#: What each task's table holds, printed above it.
TABLE_TITLES = {
    "docstrings": "Held-out results (test split of the embedded corpus; lower CE and KL are better):",
    "instruct": "Held-out results (test split of the embedded instruction task, response tokens only; lower CE and "
                "KL are better, higher ROUGE-L is better):",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``distill``'s subparsers."""
    students = "; ".join(f"{name}: {','.join(task.students)}" for name, task in TASKS.items())
    p = subparsers.add_parser(
        "demo", help="distil a cached teacher into CE-only, forward-KL and CSD students on CPU and compare them",
        description="Build the embedded data and tokenizer, train (or reuse) a small teacher, train students with "
                    "the same steps, tokens and seed (a baseline without teacher and distilled students, at TP=2 "
                    "through torchrun) and print their held-out metrics. --task docstrings (default): language "
                    "modelling on stdlib docstrings, CE and KL to the teacher. --task instruct: the embedded "
                    "instruction task (signature -> docstring), losses on response tokens only, response CE, KL and "
                    "ROUGE-L of greedy answers.")
    p.add_argument("--task", choices=sorted(TASKS), default="docstrings",
                   help="docstrings (default; make demo) or instruct (SFT teacher, response-only students, ROUGE-L)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: teacher {QUICK_TEACHER_STEPS} steps, students {QUICK_STUDENT_STEPS} steps, "
                        f"{QUICK_EVAL_WINDOWS} held-out windows or examples (cached separately from the full teacher)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every student (default: the recipes')")
    p.add_argument("--teacher-steps", type=int, default=None, help="optimizer steps of the teacher (default: the recipe's)")
    p.add_argument("--output", default=None, help="output directory (default: runs/demo, or runs/demo_instruct)")
    p.add_argument("--cache", default=None, help="cache root (default: $DISTILL_CACHE or ~/.cache/distill_plugins)")
    p.add_argument("--recipes", default=None,
                   help="folder of teacher.yaml and student_*.yaml (default: recipes/demo or recipes/demo_instruct)")
    p.add_argument("--nproc", type=int, default=2, help="processes (= tensor-parallel size) per student run (default 2)")
    p.add_argument("--teacher-nproc", type=int, default=2, help="data-parallel processes of the teacher run (default 2)")
    p.add_argument("--students", default=None,
                   help=f"comma-separated students to train (default: all of the task's; {students})")
    p.add_argument("--seed", type=int, default=1234, help="seed of every run (default 1234)")
    p.add_argument("--rebuild-teacher", action="store_true", help="retrain the teacher even if a cached one exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set training.lr=1e-3 (repeatable)")
    p.set_defaults(func=run_demo_command)
    return p


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of ``distill demo``: run the pipeline, print the table and where the PNG is."""
    students = (tuple(s.strip() for s in args.students.split(",") if s.strip()) if args.students is not None
                else None)
    steps, teacher_steps, windows = args.steps, args.teacher_steps, None
    if args.quick:
        steps = steps or QUICK_STUDENT_STEPS
        teacher_steps = teacher_steps or QUICK_TEACHER_STEPS
        windows = QUICK_EVAL_WINDOWS
    if args.nproc < 1:
        raise DistillError(f"--nproc must be >= 1, got {args.nproc}")
    output = args.output or ("runs/demo" if args.task == "docstrings" else f"runs/demo_{args.task}")
    settings = DemoSettings(
        output_dir=Path(output), task=args.task, cache=Path(args.cache).expanduser() if args.cache else None,
        recipes_dir=Path(args.recipes) if args.recipes else default_recipes_dir(args.task), students=students,
        steps=steps, teacher_steps=teacher_steps, nproc=args.nproc, teacher_nproc=args.teacher_nproc,
        seed=args.seed, overrides=tuple(args.overrides), rebuild_teacher=args.rebuild_teacher,
        eval_windows=windows)
    result = run_demo(settings)
    out = sys.stdout
    out.write(f"\n{TABLE_TITLES[args.task]}\n\n")
    out.write(result.table + "\n\n")
    for line in (instruct_verdict(result.rows) if args.task == "instruct" else verdict(result.rows)):
        out.write(f"  {line}\n")
    if args.task == "instruct":
        samples = next((r.get("samples") for r in result.rows if r["name"] == "teacher"), None) or []
        for sample in samples[:2]:
            out.write(f"\n  prompt:    {sample['prompt'].strip()!r}\n  reference: {sample['reference']!r}\n"
                      f"  teacher:   {sample['answer']!r}\n")
    if args.quick:
        out.write("  (--quick: a few steps only; the numbers are a smoke test, not a comparison)\n")
    if result.figure is not None:
        out.write(f"\nLoss curves: {result.figure}\n")
    out.write(f"Table and numbers: {result.results_json.with_suffix('.md')}, {result.results_json}\n")
    teacher_note = "reused from the cache" if result.teacher.reused else "trained and cached"
    out.write(f"Teacher ({teacher_note}): {result.teacher.directory}\n")
    out.write(f"Total time: {result.seconds:.0f}s (" + ", ".join(
        f"{k} {v:.0f}s" for k, v in result.stage_seconds.items()) + ")\n")
    out.flush()
    return 0
