"""Quality benchmark: the same students distilled with every registered objective, compared as the papers do.

What it runs
------------
The demo's teacher (``recipes/demo/teacher.yaml``, pretrained once and cached
by :func:`distill_plugins.demo.pipeline.ensure_teacher`) is distilled into the
demo's student shape (``recipes/demo/student_*.yaml``) with:

* a CE-only baseline (no teacher signal);
* every registered objective at its defaults, except CSD, which runs in its
  named instances (S,S), (U,S), (T,S), each at weight temperature 1 and 1.5
  (at 1, (S,S) has exactly twice the reverse-KL gradient, methods.md section 10);
* AdaKD (token selector ``latf`` + temperature policy ``idts``) on reverse KL,
  the base objective of the AdaKD paper's headline table.

Every method gets the same optimizer steps, tokens (global batch x sequence
length), learning rate and seeds, and 3 seeds by default (the seed changes
the student's initialisation and the data order; the teacher is fixed). Wall
time is reported beside each method, since the teacher's forward pass and
the objective cost time.

Metrics (on the test split of the embedded corpus, :mod:`distill_plugins.demo.evaluate`):
held-out cross-entropy; forward KL(teacher||student) and reverse
KL(student||teacher); top-1 agreement with the teacher; ROUGE-L F1 of greedy
continuations of held-out prompts against the true continuations
(``rouge-score``, a core dependency).

Outputs: ``benchmarks/results/quality.md`` (table of means with min..max over
seeds, and the command that produced it), ``quality.json`` (every run) and
``quality.png`` (bars with seed ranges). Finished runs are kept under
``--work`` and skipped when the benchmark is started again with the same
settings, so a long run can be stopped and resumed.

Usage::

    python benchmarks/quality.py                 # full: every method, 3 seeds (hours on 2 CPU cores)
    python benchmarks/quality.py --quick         # 6 methods, 1 seed, 40 steps: a smoke test
    python benchmarks/quality.py --only csd_ss_t1 forward_kl --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _runs, also when loaded by path
from _runs import Run, launch, train_in_pool, trained_seconds, triage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Method:
    """One row of the table: a recipe plus overrides."""

    key: str
    label: str
    recipe: str  # file in recipes/demo
    overrides: tuple[str, ...] = ()
    group: str = ""


def csd_methods() -> list[Method]:
    out = []
    for w1 in ("S", "U", "T"):
        for tau in (1.0, 1.5):
            t = "1" if tau == 1.0 else "1.5"
            out.append(Method(f"csd_{w1.lower()}s_t{t.replace('.', '')}", f"CSD ({w1},S), weight tau {t}",
                              "student_csd.yaml",
                              (f"objective.w1={w1}", "objective.w2=S", f"objective.weight_temperature={tau}"),
                              group="CSD"))
    return out


def all_methods(objective_names: list[str]) -> list[Method]:
    """CE baseline, every registered objective (CSD as its six instances), AdaKD on reverse KL."""
    methods = [Method("ce_only", "CE only (no teacher)", "student_ce.yaml", group="baseline")]
    for name in sorted(objective_names):
        if name == "csd":
            methods += csd_methods()
        else:
            methods.append(Method(name, name, "student_fkl.yaml", (f"objective={name}",), group="objective"))
    methods.append(Method("adakd_reverse_kl", "AdaKD (LATF + IDTS) on reverse_kl", "student_fkl.yaml",
                          ("objective=reverse_kl", "selector=latf", "temperature=idts"), group="AdaKD"))
    return methods


QUICK_METHODS = ("ce_only", "forward_kl", "reverse_kl", "csd_ss_t1", "csd_us_t15", "adakd_reverse_kl")


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_signature(args, method: Method, seed: int, teacher_dir: Path) -> dict:
    return {"method": method.key, "recipe": method.recipe, "overrides": list(method.overrides), "seed": seed,
            "steps": args.steps, "lr": args.lr, "teacher": str(teacher_dir), "extra": list(args.set),
            "nproc": args.nproc}


def build_command(args, run: Run, teacher) -> list[str]:
    from distill_plugins.demo.pipeline import distill_run_command

    recipe = ROOT / "recipes" / "demo" / run.method.recipe
    overrides = list(args.set) + list(run.method.overrides) + [
        f"seed={run.seed}", f"output_dir={run.directory / 'run'}", f"parallel.tensor={args.nproc}",
        f"training.steps={args.steps}", f"training.warmup_steps={max(0, min(10, args.steps // 10))}",
        f"training.log_interval={max(1, args.steps // 4)}", "training.eval_interval=0"]
    if args.lr is not None:
        overrides.append(f"training.lr={args.lr}")
    if run.method.recipe != "student_ce.yaml":
        overrides.append(f"teacher.megatron={teacher.megatron_dir}")
    return distill_run_command(recipe, overrides, nproc=args.nproc)


def evaluate_run(run: Run, teacher_model, windows, prompts, refs, tok, vocab: int, spec, args) -> dict:
    from distill_plugins.demo.evaluate import (build_eval_model, compare_models, greedy_continuations,
                                               load_run_weights, rouge_l)

    model = build_eval_model(spec, vocab_size=vocab, who="student")
    load_run_weights(model, run.directory / "run")
    m = compare_models(model, teacher_model, windows, vocab_size=vocab)
    out = {"ce": m.ce, "fkl": m.fkl, "rkl": m.rkl, "top1": m.top1}
    if prompts is not None:
        gens = greedy_continuations(model, prompts, new_tokens=args.continuation_tokens, vocab_size=vocab,
                                    eos_id=tok.eos_id, max_positions=spec.max_position_embeddings)
        out["rouge_l"] = rouge_l([tok.decode(g) for g in gens], [tok.decode(r) for r in refs])
        out["sample"] = {"prompt": tok.decode(prompts[0].tolist()), "reference": tok.decode(refs[0]),
                         "continuation": tok.decode(gens[0])}
    return out


def summarize(runs: list[Run], methods: list[Method]) -> list[dict]:
    rows = []
    for method in methods:
        done = [r for r in runs if r.method.key == method.key and r.result is not None]
        row = {"key": method.key, "name": method.label, "group": method.group, "seeds": len(done)}
        for metric in ("ce", "fkl", "rkl", "top1", "rouge_l", "seconds"):
            values = [r.result[metric] for r in done if r.result.get(metric) is not None]
            if values:
                row[f"{metric}_mean"] = statistics.fmean(values)
                row[f"{metric}_min"] = min(values)
                row[f"{metric}_max"] = max(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _cell(row: dict, metric: str, fmt: str, scale: float = 1.0) -> str:
    if f"{metric}_mean" not in row:
        return "n/a"
    mean = row[f"{metric}_mean"] * scale
    if row["seeds"] < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(row[f'{metric}_std'] * scale)}"


def markdown(rows: list[dict], teacher_row: dict, *, command: str, args, wall: float, seeds: list[int]) -> str:
    cols = ["method", "held-out CE", "KL(T‖S)", "KL(S‖T)", "top-1 agree %", "ROUGE-L", "train s/run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines.append("| teacher (reference) | {:.3f} | 0 | 0 | 100 | {} | {} |".format(
        teacher_row["ce"], f"{teacher_row['rouge_l']:.2f}" if teacher_row.get("rouge_l") is not None else "n/a",
        f"{teacher_row['train_seconds']:.0f} (pretraining)" if teacher_row.get("train_seconds") else "n/a"))
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], _cell(r, "ce", "{:.3f}"), _cell(r, "fkl", "{:.3f}"), _cell(r, "rkl", "{:.3f}"),
            _cell(r, "top1", "{:.1f}", 100.0), _cell(r, "rouge_l", "{:.2f}"),
            f"{r['seconds_mean']:.0f}" if "seconds_mean" in r else "n/a"]) + " |")
    head = [
        f"Command: `{command}`",
        "",
        f"Settings: {args.steps} optimizer steps per student, the same tokens, learning rate and seeds "
        f"({', '.join(map(str, seeds))}) for every method; mean ± standard deviation over seeds; "
        f"{args.nproc} process(es) per run (TP={args.nproc}); total wall time {wall / 60:.1f} min. "
        "Metrics on the test split of the embedded corpus: held-out CE (nats/token), KL to and from the teacher, "
        "top-1 agreement with the teacher, ROUGE-L F1 (x100) of greedy continuations "
        f"({args.continuation_tokens} tokens after {args.prompt_tokens}-token prompts, {args.prompts} prompts).",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"methods {', '.join(QUICK_METHODS)}; 1 seed; 40 steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per student (default 200; quick 40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 1 2 3; quick 1)")
    parser.add_argument("--only", nargs="+", default=None, help="method keys to run (see --list)")
    parser.add_argument("--list", action="store_true", help="print the method keys and exit")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every student (default: recipe)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (TP size) per run (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (threads are split between them)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the demo's)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts for ROUGE-L (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--continuation-tokens", type=int, default=32)
    parser.add_argument("--work", default=str(ROOT / "runs" / "quality"), help="run directories (resumable)")
    parser.add_argument("--out", default=str(RESULTS), help="where quality.{md,json,png} go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--no-rouge", action="store_true", help="skip generation and ROUGE-L")
    args = parser.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 200)
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3])

    from distill_plugins.logging import configure_logging, get_logger

    configure_logging()
    log = get_logger("benchmarks.quality")
    from distill_plugins.manager import build_plugin_host

    methods = all_methods(build_plugin_host().names("objective"))
    if args.list:
        for m in methods:
            print(f"{m.key:22s} {m.label}")
        return 0
    wanted = args.only or (list(QUICK_METHODS) if args.quick else None)
    if wanted:
        unknown = sorted(set(wanted) - {m.key for m in methods})
        if unknown:
            parser.error(f"unknown method(s) {unknown}; --list shows the keys")
        methods = [m for m in methods if m.key in wanted]
    from distill_plugins.data.embedded import build_embedded
    from distill_plugins.data.tokenizer import load_tokenizer
    from distill_plugins.demo.pipeline import DemoSettings, ensure_teacher
    from distill_plugins.recipe.load import load_recipe

    t_start = time.perf_counter()
    base, _ = load_recipe(ROOT / "recipes" / "demo" / "student_fkl.yaml", list(args.set))
    vocab_spec = base.data.tokenizer or "embedded:4096"
    built = build_embedded(int(str(vocab_spec).split(":")[1]))
    tok = load_tokenizer(built.tokenizer_path)
    settings = DemoSettings(teacher_steps=args.teacher_steps, overrides=tuple(args.set), stream=sys.stderr)
    teacher = ensure_teacher(settings, tokenizer_fingerprint=tok.fingerprint(), corpus_key=built.corpus.directory.name,
                             vocab_size=tok.vocab_size, test_prefix=built.prefixes["test"])
    log.info("teacher: %s (held-out CE %.3f)", teacher.directory, teacher.heldout_ce or float("nan"))

    work = Path(args.work)
    # Seed-major: an interrupted benchmark has every method for the first seeds.
    runs = [Run(m, s, work / f"{m.key}_seed{s}") for s in seeds for m in methods]
    pending, to_train = triage(
        runs, signature=lambda run: run_signature(args, run.method, run.seed, teacher.directory),
        trained=lambda run: trained_seconds(run, build_command(args, run, teacher), args.steps, from_metrics=True))
    log.info("%d runs (%d methods x %d seeds): %d evaluated, %d trained but not evaluated, %d to train",
             len(runs), len(methods), len(seeds), len(runs) - len(pending), len(pending) - len(to_train),
             len(to_train))

    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs * args.nproc))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # Train (a few at a time), then evaluate everything in this process.
    train_in_pool(to_train, jobs=args.jobs, log=log, start=lambda run: launch(run, build_command(args, run, teacher), env))

    from distill_plugins.demo.evaluate import (build_eval_model, compare_models, evaluation_context,
                                               greedy_continuations, heldout_prompts, heldout_windows, rouge_l)
    from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint
    from distill_plugins.recipe.schema import ModelSpec

    windows = heldout_windows(built.prefixes["test"], base.data.seq_length)
    prompts = refs = None
    if not args.no_rouge:
        prompts, refs = heldout_prompts(built.prefixes["test"], prompt_tokens=args.prompt_tokens,
                                        continuation_tokens=args.continuation_tokens, max_prompts=args.prompts)
    vocab = tok.vocab_size
    with evaluation_context():
        tspec = ModelSpec(**teacher.spec)
        tmodel = build_eval_model(tspec, vocab_size=vocab, who="teacher")
        load_megatron_checkpoint(tmodel, str(teacher.megatron_dir))
        teacher_row = {"ce": compare_models(tmodel, None, windows, vocab_size=vocab).ce,
                       "train_seconds": teacher.train_seconds}
        if prompts is not None:
            gens = greedy_continuations(tmodel, prompts, new_tokens=args.continuation_tokens, vocab_size=vocab,
                                        eos_id=tok.eos_id, max_positions=tspec.max_position_embeddings)
            teacher_row["rouge_l"] = rouge_l([tok.decode(g) for g in gens], [tok.decode(r) for r in refs])
        for run in pending:
            if run.error:
                continue
            result = evaluate_run(run, tmodel, windows, prompts, refs, tok, vocab, base.student, args)
            result["seconds"] = run.seconds
            run.result = result
            sig = run_signature(args, run.method, run.seed, teacher.directory)
            (run.directory / "result.json").write_text(json.dumps({"signature": sig, "result": result}, indent=2))
            log.info("%s seed %d: CE %.3f  KL(T||S) %.3f  top-1 %.1f%%  ROUGE-L %s", run.method.key, run.seed,
                     result["ce"], result["fkl"], 100 * result["top1"],
                     f"{result['rouge_l']:.2f}" if "rouge_l" in result else "n/a")

    wall = time.perf_counter() - t_start
    rows = summarize(runs, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    table = markdown(rows, teacher_row, command=command, args=args, wall=wall, seeds=seeds)
    (out / "quality.md").write_text("# Quality benchmark\n\n" + table)
    payload = {"command": command, "wall_seconds": wall, "steps": args.steps, "seeds": seeds, "teacher": teacher_row,
               "teacher_dir": str(teacher.directory), "rows": rows,
               "runs": [{"method": r.method.key, "seed": r.seed, "result": r.result, "error": r.error} for r in runs]}
    (out / "quality.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    from distill_plugins.demo.report import plot_metric_bars

    metrics = [("ce", "held-out CE (lower is better)"), ("fkl", "KL(teacher||student) (lower)"),
               ("top1", "top-1 agreement (higher)")]
    if not args.no_rouge:
        metrics.append(("rouge_l", "ROUGE-L (higher)"))
    plot_metric_bars([r for r in rows if r["seeds"]], metrics, out / "quality.png", label_key="name",
                     title=f"students after {args.steps} steps, {len(seeds)} seed(s); teacher CE {teacher_row['ce']:.3f}")
    print(table)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'quality.png'} in {wall / 60:.1f} min")
    failed = [r for r in runs if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
