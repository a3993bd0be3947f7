"""Instruction-quality benchmark: students distilled response-only on the embedded instruction task, scored as the papers do.

What it runs
------------
The instruction demo's teacher (``recipes/demo_instruct/teacher.yaml``: a 4x128
model fine-tuned on the responses of the task's train split, trained once and
cached by :func:`distill_plugins.demo.pipeline.ensure_instruct_teacher`) is
distilled into the demo's 2x64 student shape (``recipes/demo_instruct/``) with:

* ``sft``: the student fine-tuned on the responses alone (CE, no teacher);
* forward KL, reverse KL, skew reverse KL (alpha 0.1), JSD, TVD, at their
  registered defaults (docs/objectives.md);
* CSD (S,S), (U,S) and (T,S) (weight temperature 1);
* AdaKD (token selector ``latf`` + temperature policy ``idts``) on reverse KL;
* TAID;
* on-policy and mixed (lambda 0.5) variants of forward KL, reverse KL, skew
  reverse KL and CSD (S,S) (the CSD paper's Table 2 combinations), through the
  recipe's ``sequences`` section (``sequences.name=on_policy`` /
  ``sequences.name=mixed sequences.lmbda=0.5``; docs/sequences.md).

Every method gets the same optimizer steps, examples per step, learning rate,
seeds and student initialisation per seed; losses cover response tokens only;
the distilled students are pure KD (``ce_weight 0``). The seed changes the
student's initialisation and the data order; the teacher is fixed.

On-policy rows need the engine to honour ``sequences``: before training any of
them, a 2-step probe run checks that the engine records
:data:`ON_POLICY_METRIC` in ``metrics.jsonl``, and refuses the rows (exit 2, a
message naming the missing metric) if it does not; every finished on-policy
run is checked the same way, so a silently ignored section never gives a row.

Metrics (held-out test split, 359 examples of packages no train example comes
from; :func:`distill_plugins.demo.evaluate.instruct_metrics`): response CE
(nats per reference response token), KL(teacher || student) on the same
positions, and ROUGE-L F1 (x100, ``rouge-score``) of greedy answers (up to
``--max-new-tokens``) against the reference responses.

Outputs: ``benchmarks/results/instruct_quality.md`` (means ± standard deviation
over seeds, the settings and the command), ``instruct_quality.json`` (every
run) and ``instruct_quality.png`` (bars with the seed range). Finished runs are
kept under ``--work`` with their settings and reused when the benchmark runs
again with the same settings, so it resumes, and rows can be added later (run
the full command again: finished runs are only re-read).

Usage::

    python benchmarks/instruct_quality.py --jobs 2                       # every method, 3 seeds
    python benchmarks/instruct_quality.py --jobs 2 --methods off_policy  # the dataset-response rows only
    python benchmarks/instruct_quality.py --quick                        # 3 methods, 1 seed, 30 steps
    python benchmarks/instruct_quality.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distill_plugins.demo.evaluate import (build_eval_model, evaluation_context, instruct_metrics, load_run_weights,
                                           read_metrics, teacher_logprobs)
from distill_plugins.demo.pipeline import (DemoSettings, default_recipes_dir, distill_run_command,
                                           ensure_instruct_teacher, instruct_heldout, load_teacher_model, run_command,
                                           teacher_overrides)
from distill_plugins.demo.report import plot_metric_bars
from distill_plugins.errors import DistillError
from distill_plugins.logging import configure_logging, get_logger
from distill_plugins.recipe.load import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _runs, also when loaded by path (tests)
from _runs import Run, launch, train_in_pool, trained_seconds, triage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = get_logger("benchmarks.instruct_quality")

#: The metric the engine writes to metrics.jsonl when the step's sequences come from a sequence source.
ON_POLICY_METRIC = "on_policy_fraction"
#: Policies and their expected mean on-policy fraction (None: not checked) and the overrides selecting them.
POLICIES = {
    "off_policy": ((), None),
    "on_policy": (("sequences.name=on_policy",), 1.0),
    "mixed": (("sequences.name=mixed", "sequences.lmbda=0.5"), 0.5),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: a recipe of ``recipes/demo_instruct`` plus overrides."""

    key: str
    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    group: str = ""
    policy: str = "off_policy"

    @property
    def distilled(self) -> bool:
        return self.recipe != "student_sft.yaml"


def all_methods() -> list[Method]:
    """The rows, in table order (module docstring)."""
    fkl = "student_fkl.yaml"
    base = [
        Method("sft", "SFT only (CE on responses, no teacher)", "student_sft.yaml", group="baseline"),
        Method("forward_kl", "forward KL", fkl, ("objective=forward_kl",), group="divergence"),
        Method("reverse_kl", "reverse KL", fkl, ("objective=reverse_kl",), group="divergence"),
        Method("skew_reverse_kl", "skew reverse KL (alpha 0.1)", fkl, ("objective=skew_reverse_kl",),
               group="divergence"),
        Method("jsd", "JSD", fkl, ("objective=jsd",), group="divergence"),
        Method("tvd", "TVD", fkl, ("objective=tvd",), group="divergence"),
    ]
    for w1 in ("S", "U", "T"):
        base.append(Method(f"csd_{w1.lower()}s", f"CSD ({w1},S)", "student_csd.yaml",
                           (f"objective.w1={w1}", "objective.w2=S"), group="CSD"))
    base += [
        Method("adakd_reverse_kl", "AdaKD (LATF + IDTS) on reverse KL", fkl,
               ("objective=reverse_kl", "selector=latf", "temperature=idts"), group="AdaKD"),
        Method("taid", "TAID", fkl, ("objective=taid",), group="TAID"),
    ]
    by_key = {m.key: m for m in base}
    for policy, what in (("on_policy", "on-policy"), ("mixed", "mixed (lambda 0.5)")):
        for key in ("forward_kl", "reverse_kl", "skew_reverse_kl", "csd_ss"):
            m = by_key[key]
            base.append(Method(f"{policy}_{key}", f"{m.label}, {what}", m.recipe,
                               m.overrides + POLICIES[policy][0], group=policy, policy=policy))
    return base


QUICK_METHODS = ("sft", "forward_kl", "csd_ts")


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def run_overrides(args, method: Method, seed: int, output_dir: Path, teacher) -> list[str]:
    """Every override of one student run (the same budget for every method)."""
    out = list(args.set) + list(args.student_set) + list(method.overrides) + [
        f"seed={seed}", f"output_dir={output_dir}", f"parallel.tensor={args.nproc}",
        f"training.steps={args.steps}", f"training.warmup_steps={max(0, min(10, args.steps // 10))}",
        f"training.log_interval={max(1, args.steps // 4)}", "training.eval_interval=0"]
    if args.lr is not None:
        out.append(f"training.lr={args.lr}")
    if method.distilled:
        out += teacher_overrides(teacher)
    return out


def build_command(args, run: Run, teacher) -> list[str]:
    recipe = args.recipes / run.method.recipe
    return distill_run_command(recipe, run_overrides(args, run.method, run.seed, run.directory / "run", teacher),
                               nproc=args.nproc)


def run_signature(args, run: Run, teacher) -> dict:
    """What determines a run's result: its command and the evaluation settings."""
    return {"command": shlex.join(build_command(args, run, teacher)), "teacher": str(teacher.directory),
            "max_new_tokens": args.max_new_tokens, "eval_examples": args.eval_examples}


# ---------------------------------------------------------------------------
# On-policy checks
# ---------------------------------------------------------------------------


def on_policy_fraction(metrics_path: Path) -> Optional[float]:
    """Mean of :data:`ON_POLICY_METRIC` over the training records of a run (None: never recorded)."""
    values = [float(r[ON_POLICY_METRIC]) for r in read_metrics(metrics_path)
              if "step" in r and isinstance(r.get(ON_POLICY_METRIC), (int, float))]
    return statistics.fmean(values) if values else None


def check_on_policy_run(run: Run) -> Optional[str]:
    """An error message when an on-policy/mixed run did not use generated sequences as asked (None: fine)."""
    expected = POLICIES[run.method.policy][1]
    if expected is None:
        return None
    fraction = on_policy_fraction(run.directory / "run" / "metrics.jsonl")
    if fraction is None:
        return (f"{run.method.key}: the engine recorded no {ON_POLICY_METRIC!r} in metrics.jsonl, so it ignored "
                f"the recipe's sequences section ({' '.join(POLICIES[run.method.policy][0])}); the row would be an "
                "off-policy run under an on-policy name")
    if abs(fraction - expected) > 0.25:
        return (f"{run.method.key}: mean {ON_POLICY_METRIC} {fraction:.2f}, expected about {expected} "
                f"({' '.join(POLICIES[run.method.policy][0])})")
    run.extra[ON_POLICY_METRIC] = fraction
    return None


def probe_on_policy(args, teacher, env: dict, methods: list[Method]) -> None:
    """A 2-step on-policy run of the first requested on-policy method; raises when the engine ignores ``sequences``.

    Raises:
        DistillError: the probe failed or its metrics lack :data:`ON_POLICY_METRIC`.
    """
    method = next(m for m in methods if m.policy != "off_policy")
    probe_dir = Path(args.work) / "_on_policy_probe"
    if probe_dir.exists():
        shutil.rmtree(probe_dir)
    overrides = run_overrides(args, method, 1, probe_dir / "run", teacher)
    overrides = [o for o in overrides if not o.startswith(("training.steps=", "training.warmup_steps="))]
    overrides += ["training.steps=2", "training.warmup_steps=0", "training.log_interval=1"]
    log.info("probe: 2 steps of %s to check that the engine honours the sequences section", method.key)
    try:
        run_command(distill_run_command(args.recipes / method.recipe, overrides, nproc=args.nproc),
                    log_path=probe_dir / "console.log", stream=None, env=env, what="on-policy probe run")
    except DistillError as exc:
        raise DistillError(f"the on-policy rows need an engine that runs the recipe's sequences section; the probe "
                           f"run of {method.key} failed: {exc}") from None
    error = check_on_policy_run(Run(method, 1, probe_dir))
    if error is not None:
        raise DistillError(f"refusing the on-policy rows: {error}. Run the off-policy rows alone with "
                           "--methods off_policy, or update the engine (docs/sequences.md)")
    log.info("probe: the engine recorded %s; on-policy rows enabled", ON_POLICY_METRIC)


# ---------------------------------------------------------------------------
# Evaluation and tables
# ---------------------------------------------------------------------------


def evaluate_run(run: Run, teacher, data, spec, args) -> dict:
    model = build_eval_model(spec, vocab_size=data.tokenizer.vocab_size, who="student")
    load_run_weights(model, run.directory / "run")
    m = instruct_metrics(model, teacher, data.test, data.tokenizer, vocab_size=data.tokenizer.vocab_size,
                         max_new_tokens=args.max_new_tokens, max_examples=args.eval_examples)
    out = {"response_ce": m.response_ce, "fkl": m.fkl, "rkl": m.rkl, "rouge_l": m.rouge_l,
           "answer_tokens": m.answer_tokens, "examples": m.examples, "samples": list(m.samples),
           "seconds": run.seconds}
    if ON_POLICY_METRIC in run.extra:
        out[ON_POLICY_METRIC] = run.extra[ON_POLICY_METRIC]
    return out


METRICS = ("response_ce", "fkl", "rkl", "rouge_l", "seconds", ON_POLICY_METRIC)


def summarize(runs: list[Run], methods: list[Method]) -> list[dict]:
    """One row per method: ``<metric>_{mean,std,min,max}`` over its evaluated seeds."""
    rows = []
    for method in methods:
        done = [r for r in runs if r.method.key == method.key and r.result is not None]
        row = {"key": method.key, "name": method.label, "group": method.group, "policy": method.policy,
               "seeds": len(done), "of_seeds": sum(1 for r in runs if r.method.key == method.key),
               "failed": sum(1 for r in runs if r.method.key == method.key and r.error)}
        for metric in METRICS:
            values = [r.result[metric] for r in done if r.result.get(metric) is not None]
            if values:
                row[f"{metric}_mean"] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[f"{metric}_min"] = min(values)
                row[f"{metric}_max"] = max(values)
        rows.append(row)
    return rows


def _cell(row: dict, metric: str, fmt: str) -> str:
    if f"{metric}_mean" not in row:
        return "failed" if row.get("failed") else "not run"
    seeds = "" if row["seeds"] == row.get("of_seeds", row["seeds"]) else f" ({row['seeds']} seed{'s' * (row['seeds'] > 1)})"
    if row["seeds"] < 2:
        return fmt.format(row[f"{metric}_mean"]) + seeds
    return f"{fmt.format(row[f'{metric}_mean'])} ± {fmt.format(row[f'{metric}_std'])}{seeds}"


SECTIONS = (("off_policy", "Dataset responses (off-policy)"), ("on_policy", "On-policy (student-sampled responses)"),
            ("mixed", "Mixed: each example's response sampled from the student with probability 0.5"))


def read_invocations(work: Path) -> list[dict]:
    """The training invocations recorded in ``work/invocations.jsonl`` (command, wall seconds, runs trained)."""
    path = work / "invocations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown(rows: list[dict], teacher_row: dict, *, command: str, args, wall: float, seeds: list[int],
             invocations: list[dict] = ()) -> str:
    cols = ["method", "response CE", "KL(T‖S)", "ROUGE-L", "train s/run"]
    trained = [f"`{i['command']}` ({i['trained']} runs trained, {i['wall_seconds'] / 60:.1f} min"
               + (f"; {i['note']}" if i.get("note") else "") + ")" for i in invocations if i.get("trained")]
    head = [
        f"Command: `{command}`",
        "",
    ] + ([f"Runs trained by: {'; '.join(trained)}.", ""] if trained else []) + [
        f"Settings: teacher {teacher_row['size']} ({teacher_row['steps']} steps SFT, cached), students 2x64 from "
        f"random weights, {args.steps} optimizer steps of {args.batch} examples each (response tokens only) for every "
        f"method, the same learning rate and seeds ({', '.join(map(str, seeds))}); mean ± standard deviation over "
        f"seeds; {args.nproc} process(es) per run (TP={args.nproc}), {args.jobs} run(s) at a time; wall time of this "
        f"invocation {wall / 60:.1f} min. Held-out: the {teacher_row['examples']} test examples (packages unseen in training): "
        "response CE (nats per reference response token), KL(teacher‖student) on the same positions, ROUGE-L F1 "
        f"(x100, rouge-score) of greedy answers of at most {args.max_new_tokens} tokens.",
        "",
    ]
    lines = []
    for policy, title in SECTIONS:
        section = [r for r in rows if r["policy"] == policy]
        if not section:
            continue
        extra = policy != "off_policy"
        c = cols + (["on-policy fraction"] if extra else [])
        lines += [f"**{title}**", "", "| " + " | ".join(c) + " |", "|" + "|".join(["---"] + ["---:"] * (len(c) - 1)) + "|"]
        if policy == "off_policy":
            lines.append("| teacher (reference) | {:.3f} | 0 | {:.2f} | {} |".format(
                teacher_row["response_ce"], teacher_row["rouge_l"],
                f"{teacher_row['train_seconds']:.0f} (SFT)" if teacher_row.get("train_seconds") else "n/a"))
        for r in section:
            cells = [r["name"], _cell(r, "response_ce", "{:.3f}"), _cell(r, "fkl", "{:.3f}"),
                     _cell(r, "rouge_l", "{:.2f}"), f"{r['seconds_mean']:.0f}" if "seconds_mean" in r else "n/a"]
            if extra:
                cells.append(_cell(r, ON_POLICY_METRIC, "{:.2f}"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(head + lines + on_policy_deltas(rows))


def on_policy_deltas(rows: list[dict]) -> list[str]:
    """Lines of a table: per objective, on-policy and mixed minus dataset responses (ROUGE-L, response CE)."""
    by = {r["key"]: r for r in rows}
    out = []
    for key in ("forward_kl", "reverse_kl", "skew_reverse_kl", "csd_ss"):
        base = by.get(key)
        if base is None or "rouge_l_mean" not in base:
            continue
        cells = [base["name"], f"{base['rouge_l_mean']:.2f}", f"{base['response_ce_mean']:.3f}"]
        found = False
        for policy in ("on_policy", "mixed"):
            r = by.get(f"{policy}_{key}")
            if r is not None and "rouge_l_mean" in r:
                found = True
                cells += [f"{r['rouge_l_mean'] - base['rouge_l_mean']:+.2f}",
                          f"{r['response_ce_mean'] - base['response_ce_mean']:+.3f}"]
            else:
                cells += ["not run", "not run"]
        if found:
            out.append("| " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["**On-policy data against dataset responses, per objective** (differences of the means; ROUGE-L: "
            "higher is better, response CE: lower is better; the CSD paper's Table 2 reports ImitKD + CSD "
            "20.73 against ImitKD 16.69 ROUGE-L for GPT-2 0.1 B, and ImitKD 19.23, + DLD 22.32, + CSD 23.12 for "
            "0.3 B; docs/demo.md reads the two side by side)", "",
            "| objective | ROUGE-L, dataset | response CE, dataset | Δ ROUGE-L, on-policy | Δ response CE, on-policy "
            "| Δ ROUGE-L, mixed | Δ response CE, mixed |", "|---|---:|---:|---:|---:|---:|---:|"] + out + [""]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def select_methods(parser, wanted: Optional[list[str]], methods: list[Method]) -> list[Method]:
    """Methods named by key or by policy (``off_policy``, ``on_policy``, ``mixed``), in table order."""
    if not wanted:
        return methods
    known = {m.key for m in methods} | set(POLICIES)
    unknown = sorted(set(wanted) - known)
    if unknown:
        parser.error(f"unknown method(s) {unknown}; --list shows the keys (or give off_policy, on_policy, mixed)")
    return [m for m in methods if m.key in wanted or m.policy in wanted]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: methods {', '.join(QUICK_METHODS)}, 1 seed, 30 steps, 64 test examples")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per student (default 200; quick 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 1 2 3; quick 1)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method keys, or off_policy / on_policy / mixed for a whole group (see --list)")
    parser.add_argument("--list", action="store_true", help="print the method keys and exit")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every student (default: the recipe's)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (TP size) per run (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (threads are split between them)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the recipe's)")
    parser.add_argument("--eval-examples", type=int, default=None, help="test examples scored (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer (default 64)")
    parser.add_argument("--recipes", default=None, help="folder of the instruct demo recipes (default: recipes/demo_instruct)")
    parser.add_argument("--cache", default=None, help="cache root (default: $DISTILL_CACHE or ~/.cache/distill_plugins)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "instruct_quality"), help="run directories (resumable)")
    parser.add_argument("--out", default=str(RESULTS), help="where instruct_quality.{md,json,png} go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the teacher run only (its model is student.* there)")
    parser.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the student runs only")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: evaluate the finished runs and write the files (missing runs: n/a)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 200)
    if args.quick and args.eval_examples is None:
        args.eval_examples = 64
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3])
    args.recipes = Path(args.recipes) if args.recipes else default_recipes_dir("instruct")
    cache = Path(args.cache).expanduser() if args.cache else None

    configure_logging()
    methods = all_methods()
    if args.list:
        for m in methods:
            print(f"{m.key:28s} {m.policy:11s} {m.label}")
        return 0
    methods = select_methods(parser, args.methods or (list(QUICK_METHODS) if args.quick else None), methods)
    if args.jobs < 1 or args.nproc < 1:
        parser.error("--jobs and --nproc must be >= 1")

    command = "python benchmarks/instruct_quality.py" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    t_start = time.perf_counter()
    base = load_recipe(args.recipes / "student_fkl.yaml", list(args.set) + list(args.student_set))[0]
    args.batch = base.training.global_batch_size
    data = instruct_heldout(base, cache=cache)
    settings = DemoSettings(task="instruct", cache=cache, recipes_dir=args.recipes, teacher_steps=args.teacher_steps,
                            overrides=tuple(args.set), teacher_overrides=tuple(args.teacher_set),
                            teacher_nproc=2, eval_windows=args.eval_examples, stream=sys.stderr)
    teacher = ensure_instruct_teacher(settings, data)
    log.info("teacher: %s (held-out response CE %.3f)", teacher.directory, teacher.heldout_ce or float("nan"))

    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs * args.nproc))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if cache is not None:
        env["DISTILL_CACHE"] = str(cache)

    work = Path(args.work)
    # Off-policy rows first, then seed-major: an interrupted run has every method for the first seeds.
    runs = [Run(m, s, work / f"{m.key}_seed{s}") for m in methods for s in seeds]
    runs.sort(key=lambda r: (r.method.policy != "off_policy", r.seed, methods.index(r.method)))
    pending, to_train = triage(runs, signature=lambda run: run_signature(args, run, teacher),
                               trained=lambda run: trained_seconds(run, build_command(args, run, teacher), args.steps))
    to_eval = [r for r in pending if r not in to_train]
    if args.report_only:
        to_train = []
    log.info("%d runs (%d methods x %d seeds): %d evaluated, %d trained but not evaluated, %d to train",
             len(runs), len(methods), len(seeds), len(runs) - len(pending), len(to_eval), len(to_train))
    if any(r.method.policy != "off_policy" for r in to_train):
        try:
            probe_on_policy(args, teacher, env, [r.method for r in to_train])
        except DistillError as exc:
            log.error("%s", exc)
            return 2

    with evaluation_context():
        tmodel = load_teacher_model(teacher)
        tm = instruct_metrics(tmodel, None, data.test, data.tokenizer, vocab_size=data.tokenizer.vocab_size,
                              max_new_tokens=args.max_new_tokens, max_examples=args.eval_examples)
        teacher_row = {"response_ce": tm.response_ce, "rouge_l": tm.rouge_l, "examples": tm.examples,
                       "answer_tokens": tm.answer_tokens, "samples": list(tm.samples),
                       "train_seconds": teacher.train_seconds, "steps": teacher.steps,
                       "size": f"{teacher.spec['num_layers']}x{teacher.spec['hidden_size']}"}
        log.info("teacher: response CE %.3f, ROUGE-L %.2f", tm.response_ce, tm.rouge_l)
        reference = teacher_logprobs(tmodel, data.test, vocab_size=data.tokenizer.vocab_size,
                                     max_examples=args.eval_examples)

        def finish(run: Run) -> None:
            error = check_on_policy_run(run)
            if error is not None:
                run.error = error
                log.error("%s", error)
                return
            run.result = evaluate_run(run, reference, data, base.student, args)
            (run.directory / "result.json").write_text(json.dumps(
                {"signature": run_signature(args, run, teacher), "result": run.result}, indent=2) + "\n")
            log.info("%s seed %d: response CE %.3f  KL(T||S) %.3f  ROUGE-L %.2f  (%.0fs)", run.method.key, run.seed,
                     run.result["response_ce"], run.result["fkl"], run.result["rouge_l"], run.seconds)

        for run in to_eval:
            finish(run)
        # Train a few at a time; evaluate each finished run here once its slot has been refilled, so the
        # next runs train during the evaluation.
        train_in_pool(to_train, jobs=args.jobs, log=log, finish=finish,
                      start=lambda run: launch(run, build_command(args, run, teacher), env))

    wall = time.perf_counter() - t_start
    rows = summarize(runs, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained_here = sum(1 for r in to_train if r.result is not None or r.error)
    if trained_here:
        with open(work / "invocations.jsonl", "a") as fh:
            fh.write(json.dumps({"command": command, "wall_seconds": wall, "trained": trained_here,
                                 "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    table = markdown(rows, teacher_row, command=command, args=args, wall=wall, seeds=seeds,
                     invocations=read_invocations(work))
    (out / "instruct_quality.md").write_text("# Instruction-quality benchmark\n\n" + table)
    payload = {"command": command, "wall_seconds": wall, "invocations": read_invocations(work), "steps": args.steps,
               "seeds": seeds, "teacher": teacher_row,
               "teacher_dir": str(teacher.directory), "rows": rows,
               "runs": [{"method": r.method.key, "policy": r.method.policy, "seed": r.seed, "result": r.result,
                         "error": r.error} for r in runs]}
    (out / "instruct_quality.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plotted = [r for r in rows if r["seeds"]]
    if plotted:
        plot_metric_bars(plotted, [("response_ce", "response CE (lower is better)"),
                                   ("fkl", "KL(teacher||student) (lower)"), ("rouge_l", "ROUGE-L (higher)")],
                         out / "instruct_quality.png", label_key="name",
                         title=f"instruction task: students after {args.steps} steps, {len(seeds)} seed(s); teacher "
                               f"response CE {teacher_row['response_ce']:.3f}, ROUGE-L {teacher_row['rouge_l']:.2f}")
    print(table)
    print(f"wrote {out / 'instruct_quality.md'}, {out / 'instruct_quality.json'}, {out / 'instruct_quality.png'} "
          f"in {wall / 60:.1f} min")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
