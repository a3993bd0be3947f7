"""Benchmark: a teacher on its own ranks against the co-located teacher, on the same 4 CPU processes.

Usage::

    .venv/bin/python benchmarks/separate_teacher.py                 # default sizes, 12 steps
    .venv/bin/python benchmarks/separate_teacher.py --quick         # the tiny recipe's models, a smoke test
    .venv/bin/python benchmarks/separate_teacher.py --steps 20 teacher.num_layers=8

One group of 4 gloo processes (``distill_plugins.testing.distributed``) runs, back to
back, ``recipes/tiny/separate_teacher_dp2.yaml`` (with the overrides below unless
``--quick``) three ways:

* ``co-located``: the same recipe at TP=1 PP=1 (``teacher_parallel=null``), DP=4 over
  the 4 processes, the teacher on every rank beside the student;
* ``separate``: student DP=2 on ranks 0-1, teacher TP=2 on ranks 2-3, one step ahead
  (``teacher_parallel.lookahead: true``, the default);
* ``separate, no lookahead``: the same, each step computed after the previous one.

Per configuration: the median step time over the steps after ``--warmup`` (the
``step_time_s`` metric, identical on every rank), tokens per second, and for the
separate runs the students' median wait for payloads per step (``teacher_wait_s``)
and its share of the step. Then the payload's bytes per token (the teacher's hidden
state, ``h_t x w``) against the teacher's logits (``V x w``) and the planner's compute
balance (teacher FLOPs per GPU / student FLOPs per GPU). Writes
``benchmarks/results/separate_teacher.json``; the results and their reading are in
docs/separate_teacher.md.

On a CPU machine the 4 processes share the cores, so the separate mode's overlap
(the teacher computing step n+1 while the students train step n) only shows when
there are at least as many free cores as processes; the wait time shows who waits
for whom either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill_plugins.engine.callbacks import Callback  # noqa: E402
from distill_plugins.engine.teacher_ranks import logits_bytes_per_token, payload_bytes_per_token  # noqa: E402
from distill_plugins.plan import resolve_shape  # noqa: E402
from distill_plugins.plan_separate import compute_balance  # noqa: E402
from distill_plugins.recipe.load import load_recipe  # noqa: E402
from distill_plugins.testing.distributed import run_distributed  # noqa: E402

RECIPE = ROOT / "recipes/tiny/separate_teacher_dp2.yaml"
#: models large enough for the step time to be compute, small enough for 2 CPU cores
DEFAULT_OVERRIDES = (
    "student.num_layers=4", "student.hidden_size=256", "student.num_attention_heads=8", "student.num_query_groups=4",
    "student.vocab_size=4096", "student.max_position_embeddings=256",
    "teacher.num_layers=6", "teacher.hidden_size=384", "teacher.num_attention_heads=8", "teacher.num_query_groups=8",
    "teacher.vocab_size=4096", "teacher.max_position_embeddings=256",
    "parallel.make_vocab_size_divisible_by=128", "data.seq_length=128",
    "training.micro_batch_size=2", "training.global_batch_size=16", "training.lr=1e-4",
)
CONFIGS = {"co-located": ["teacher_parallel=null", "parallel.tensor=1", "parallel.pipeline=1"],
           "separate": ["teacher_parallel.lookahead=true"],
           "separate, no lookahead": ["teacher_parallel.lookahead=false"]}


class _Record(Callback):
    def __init__(self):
        self.steps: list[dict] = []

    def on_step_end(self, engine, result):
        self.steps.append(dict(result.metrics))


def _reset() -> None:
    from megatron.core import parallel_state as ps

    from distill_plugins.engine import process_groups

    if ps.model_parallel_is_initialized():
        process_groups.destroy()


def _one(name: str, overrides: list[str], out: str) -> dict:
    from distill_plugins.engine.remote_teacher import SeparateRun
    from distill_plugins.engine.role_groups import initialize_roles
    from distill_plugins.engine.run import Engine, resolve_specs, resolve_vocab_sizes

    _reset()
    recipe, host = load_recipe(RECIPE, [*overrides, *CONFIGS[name], f"output_dir={out}", "checkpoint.resume=none",
                                        "checkpoint.interval=0", "training.eval_interval=0"])
    rec = _Record()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    if recipe.teacher_parallel is None:
        side = Engine(recipe, host, cpu=True, callbacks=[rec])
    else:
        resolved = resolve_specs(recipe)
        roles = initialize_roles(resolved, cpu=True)
        side = SeparateRun(resolved, roles, cpu=True, vocab_size=resolve_vocab_sizes(resolved)[0],
                           build_student=lambda p: Engine(recipe, host, cpu=True, teacher_provider=p, callbacks=[rec]))
        side.connect()
    built = time.perf_counter() - t0
    side.train()
    return {"build_s": built, "steps": rec.steps}


def body(rank: int, world: int, overrides: list[str], out: str, threads: int) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    torch.set_num_threads(threads)
    res = {name: _one(name, overrides, os.path.join(out, name.replace(", ", "_").replace(" ", "_")))
           for name in CONFIGS}
    _reset()
    return res


def summarise(per_rank: list[dict], *, warmup: int, recipe) -> dict:
    """Medians over the timed steps, from rank 0 (a student rank: every rank has the same step metrics)."""
    rows = {}
    for name, run in per_rank[0].items():
        timed = run["steps"][warmup:]
        step = statistics.median(m["step_time_s"] for m in timed)
        tokens = statistics.median(m["tokens"] for m in timed)
        row = {"step_time_s": step, "tokens_per_second": tokens / step, "build_s": run["build_s"],
               "loss_last": timed[-1]["loss"], "steps_timed": len(timed)}
        if "teacher_wait_s" in timed[0]:
            wait = statistics.median(m["teacher_wait_s"] for m in timed)
            row.update(teacher_wait_s=wait, wait_share=wait / step)
        rows[name] = row
    s, t = resolve_shape("student", recipe.student, []), resolve_shape("teacher", recipe.teacher, [])
    precision = recipe.training.precision
    return {
        "configs": rows,
        "payload_bytes_per_token": payload_bytes_per_token(t.hidden_size, precision),
        "logits_bytes_per_token": logits_bytes_per_token(t.vocab_size, precision),
        "balance": compute_balance(s, t, students=2, teachers=recipe.teacher_parallel.ranks),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides after the defaults")
    p.add_argument("--quick", action="store_true", help="the tiny recipe's models as they are (smoke test)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "separate_teacher.json"))
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    overrides = ([] if args.quick else list(DEFAULT_OVERRIDES)) + [f"training.steps={args.steps}", *args.overrides]
    recipe, _ = load_recipe(RECIPE, overrides)
    with tempfile.TemporaryDirectory(prefix="distill-separate-bench-") as tmp:
        t0 = time.time()
        per_rank = run_distributed(body, 4, args=(overrides, tmp, args.threads), timeout=3600)
        wall = time.time() - t0
    report = {"recipe": str(RECIPE.relative_to(ROOT)), "overrides": overrides, "steps": args.steps,
              "warmup": args.warmup, "threads_per_process": args.threads, "wall_s": wall,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              **summarise(per_rank, warmup=args.warmup, recipe=recipe)}
    print(f"{RECIPE.relative_to(ROOT)}, 4 CPU processes ({os.cpu_count()} cores), {args.steps} steps "
          f"(median of the last {args.steps - args.warmup}), global batch {recipe.training.global_batch_size} x "
          f"{recipe.data.seq_length} tokens")
    print(f"{'configuration':<24}{'step s':>9}{'tok/s':>9}{'wait s':>9}{'wait %':>8}")
    for name, row in report["configs"].items():
        wait = f"{row['teacher_wait_s']:>9.3f}{100 * row['wait_share']:>7.0f}%" if "teacher_wait_s" in row else \
            f"{'-':>9}{'-':>8}"
        print(f"{name:<24}{row['step_time_s']:>9.3f}{row['tokens_per_second']:>9.0f}{wait}")
    pb, lb = report["payload_bytes_per_token"], report["logits_bytes_per_token"]
    print(f"payload {pb} B/token (teacher hidden {pb // (4 if recipe.training.precision == 'fp32' else 2)} x "
          f"{recipe.training.precision}) vs logits {lb} B/token: {lb / pb:.1f}x less")
    print(f"compute balance (teacher / student FLOPs per process): {report['balance']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
