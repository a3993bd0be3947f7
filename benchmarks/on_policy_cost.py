"""Benchmark: the cost of an on-policy step against an off-policy step on the same shapes (CPU, TP=2).

Usage::

    .venv/bin/python benchmarks/on_policy_cost.py                  # default sizes, 8 steps per source
    .venv/bin/python benchmarks/on_policy_cost.py --quick          # the tiny recipe's models, a smoke test
    .venv/bin/python benchmarks/on_policy_cost.py --steps 12 sequences.max_new_tokens=32
    .venv/bin/python benchmarks/on_policy_cost.py --render benchmarks/results/on_policy_cost.json  # table only

One group of 2 gloo processes (``distill_plugins.testing.distributed``, TP=2,
PP=1, DP=1) builds one engine for ``recipes/tiny/on_policy_tp2_pp2.yaml`` at
``parallel.pipeline=1`` (with the overrides below unless ``--quick``) and trains
it with three sequence sources taking turns step by step (``dataset``,
``on_policy``, ``mixed``, ``dataset``, ...), so a change in the machine's load
during the run (the cores are shared) touches the three alike:

* ``dataset`` (off-policy: the data's responses, no generation);
* ``on_policy`` (every response sampled from the student);
* ``mixed`` with ``lmbda: 0.5`` (half the responses, in expectation).

Every step trains on microbatches of the same ``[micro_batch, seq_length]``
shape (the window is padded to ``seq_length`` whatever the response), so the
difference in step time is the generation. Per source: the median step time over the
steps after ``--warmup`` (``step_time_s``), the median generation time
(``gen_s``, part of the step time) and its share of the step, the tokens
generated per step and per generation second, and the on-policy fraction.
Writes ``benchmarks/results/on_policy_cost.json`` and
``benchmarks/results/on_policy_cost.md``; docs/sequences.md quotes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill_plugins.recipe.load import load_recipe  # noqa: E402
from distill_plugins.testing.distributed import run_distributed  # noqa: E402

RECIPE = ROOT / "recipes/tiny/on_policy_tp2_pp2.yaml"
#: models large enough for the step time to be compute, small enough for 2 CPU cores
DEFAULT_OVERRIDES = (
    "student.num_layers=4", "student.hidden_size=128", "student.num_attention_heads=4", "student.num_query_groups=2",
    "teacher.num_layers=4", "teacher.hidden_size=256", "teacher.num_attention_heads=8", "teacher.num_query_groups=4",
    "data.seq_length=128", "training.micro_batch_size=2", "training.global_batch_size=8", "training.lr=1e-4",
    "training.warmup_steps=0", "training.lr_decay=constant",
)
SAMPLING = "temperature: 1.0, top_p: 1.0, max_new_tokens: 64"
SOURCES = {"dataset (off-policy)": "sequences=dataset",
           "on_policy": "sequences={name: on_policy, %s}" % SAMPLING,
           "mixed, lmbda 0.5": "sequences={name: mixed, lmbda: 0.5, %s}" % SAMPLING}
KEYS = ("step_time_s", "gen_s", "generated_tokens", "on_policy_fraction", "loss")


def _body(rank: int, world: int, overrides: list[str], steps: int, out: str) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.engine.run import Engine
    from distill_plugins.engine.sequences import SequenceRuntime

    enable_cpu_mode()
    common = overrides + [f"training.steps={steps * len(SOURCES)}", f"output_dir={out}", "checkpoint.resume=none"]
    recipe, host = load_recipe(RECIPE, common + [SOURCES["on_policy"]])
    eng = Engine(recipe, host, cpu=True)
    runtimes = {label: SequenceRuntime.build(load_recipe(RECIPE, common + [source])[0], host, ctx=eng.ctx,
                                             data=eng.data) for label, source in SOURCES.items()}
    results: dict = {label: [] for label in SOURCES}
    for _ in range(steps):
        for label, runtime in runtimes.items():  # the sources take turns on the same engine
            eng.trainer.sequences = runtime
            metrics = eng.trainer.train_step().metrics
            results[label].append({k: metrics.get(k, 0.0) for k in KEYS})
    return results


def _summary(steps: list[dict], warmup: int) -> dict:
    """Medians over the timed steps; share and training part are taken per step, then the median."""
    timed = steps[warmup:] or steps
    med = lambda values: statistics.median(list(values))  # noqa: E731
    return {"step_time_s": med(s["step_time_s"] for s in timed), "gen_s": med(s["gen_s"] for s in timed),
            "gen_share": med(min(1.0, s["gen_s"] / s["step_time_s"]) for s in timed),
            "train_s": med(max(0.0, s["step_time_s"] - s["gen_s"]) for s in timed),
            "generated_tokens": statistics.mean(s["generated_tokens"] for s in timed),
            "gen_tokens_per_s": med(s["generated_tokens"] / s["gen_s"] if s["gen_s"] else 0.0 for s in timed),
            "on_policy_fraction": statistics.mean(s["on_policy_fraction"] for s in timed),
            "fastest_step_s": min(s["step_time_s"] for s in timed),
            "fastest_gen_s": min(timed, key=lambda s: s["step_time_s"])["gen_s"],
            "steps_timed": len(timed)}


def _markdown(report: dict) -> str:
    rows = report["results"]
    base = rows["dataset (off-policy)"]["step_time_s"]
    lines = [
        "# On-policy step cost (CPU, TP=2)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}; 2 gloo processes (TP=2, PP=1, DP=1); one engine, "
        f"the sources taking turns step by step; {report['steps']} steps per source, medians over the last "
        f"{report['steps'] - report['warmup']}.",
        "",
    ]
    if "load_average" in report:  # other processes sharing the cores slow every source alike, not evenly per step
        before, after = report["load_average"]["before"], report["load_average"]["after"]
        lines += [f"Machine load (1-minute load average) before / after the run: {before[0]:.1f} / {after[0]:.1f} "
                  f"on {os.cpu_count()} cores.", ""]
    lines += [
        f"Shapes: {', '.join(report['overrides']) or 'the tiny recipe'}; sampling `{SAMPLING}`.",
        "",
        "| source | step (s) | x off-policy | generation (s) | generation share | training part (s) "
        "| tokens generated / step | generated tok/s | on-policy fraction | fastest step (s) (its generation) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fastest = rows["dataset (off-policy)"]["fastest_step_s"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['step_time_s']:.3f} | {r['step_time_s'] / base:.2f} | {r['gen_s']:.3f} | "
                     f"{100 * r['gen_share']:.0f}% | {r['train_s']:.3f} | {r['generated_tokens']:.0f} | "
                     f"{r['gen_tokens_per_s']:.0f} | {r['on_policy_fraction']:.2f} | {r['fastest_step_s']:.3f} "
                     f"({r['fastest_gen_s']:.3f}; x{r['fastest_step_s'] / fastest:.1f}) |")
    lines += [
        "",
        "`step` is `step_time_s`, `generation` is `gen_s` (part of the step: plan, generate, rebuild the batches), "
        "`training part` is step minus generation (per step, then the median). Every source trains on microbatches "
        "of the same shape, so the training parts should agree and the difference is the generation: one "
        "KV-cached decoding step per generated position for all the step's sampled rows together (prefill over "
        "the shortest prompt, then the longer prompts and the new tokens one position at a time), each a forward "
        "of the student under TP=2 and a broadcast of the chosen tokens. On shared cores the medians carry the other "
        "processes' load; the fastest step of each source (last column) is the least disturbed figure.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny recipe's models, 3 steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a results JSON")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    args = parser.parse_args(argv)
    if args.render:  # the same figures, summarised again (e.g. after a change of the table)
        report = json.loads(Path(args.render).read_text())
        report["results"] = {label: _summary(steps_, report["warmup"]) for label, steps_ in report["raw"].items()}
        Path(args.out, "on_policy_cost.md").write_text(_markdown(report))
        return 0
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    overrides = ([] if args.quick else list(DEFAULT_OVERRIDES)) + ["parallel.tensor=2", "parallel.pipeline=1"]
    overrides += args.overrides
    load_recipe(RECIPE, overrides)  # a bad override fails here, before any process starts
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="on-policy-cost-") as out:
        per_rank = run_distributed(_body, world_size=2, args=(overrides, steps, out))
    report = {
        "command": "python benchmarks/on_policy_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
        "steps": steps, "warmup": warmup, "overrides": overrides,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "results": {label: _summary(steps_, warmup) for label, steps_ in per_rank[0].items()},
        "raw": per_rank[0],
    }
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "on_policy_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out, "on_policy_cost.md").write_text(_markdown(report))
    sys.stdout.write(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
