"""``distill eval``: score a trained student on a held-out instruction split (docs/eval.md).

::

    distill eval RECIPE [key=value ...] --checkpoint PATH      # a run checkpoint (step_N, checkpoints/ or the run dir)
    distill eval RECIPE [key=value ...] --model hf:DIR         # an exported model (also megatron:DIR, checkpoint:DIR)
        [--split valid|test] [--num-examples N] [--max-new-tokens N] [--batch-size N]
        [--output FILE] [--output-dir DIR] [--no-generate] [--cpu]

Overrides may stand anywhere after RECIPE. The recipe says everything else: the data (``data.kind: instruct``), the
teacher (built and loaded as in training; none with ``loss.kd_weight: 0``) and
the parallel layout (TP/PP/DP; run under ``torchrun`` for more than one
process, generation is collective). The student's shape and weights come from
the checkpoint or the model directory (``student.checkpoint`` / ``student.hf``
/ ``student.megatron``: any TP/PP layout loads). Reports response-only CE, KL
(teacher || student) on the reference responses, ROUGE-L F1 of greedy answers
and the number of examples (:func:`distill_plugins.engine.evaluation.evaluate_instruct`);
writes one ``eval_*`` line to ``<output_dir>/metrics.jsonl`` and a JSON file
(default ``<output_dir>/eval_step_<N>.json``) with every example's answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from distill_plugins.errors import DistillError

#: ``--model`` prefixes and the student spec key each sets
MODEL_KINDS = ("hf", "megatron", "checkpoint")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``distill``'s subparsers."""
    p = subparsers.add_parser("eval", help="response CE, KL to the teacher and ROUGE-L of greedy answers on held-out "
                                           "instruction data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", default=None,
                       help="a run checkpoint (…/checkpoints/step_N), a directory of them or a run directory "
                            "(newest complete checkpoint)")
    which.add_argument("--model", default=None, metavar="SPEC",
                       help="hf:DIR (an exported or Hugging Face model), megatron:DIR or checkpoint:DIR")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="held-out split (default valid)")
    p.add_argument("--num-examples", type=int, default=None,
                   help="score the first N examples of the split's order (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default training.eval_max_new_tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call per data-parallel rank")
    p.add_argument("--output", default=None, help="JSON file to write (default <output-dir>/eval_step_<N>.json)")
    p.add_argument("--output-dir", default=None, help="where metrics.jsonl is appended (default the recipe's output_dir)")
    p.add_argument("--no-generate", action="store_true", help="CE and KL only (no answers, no ROUGE-L)")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (same as device=cpu)")
    p.set_defaults(func=run_eval)
    return p


def student_source(checkpoint: str | None, model: str | None) -> tuple[str, Path, int | None]:
    """``(kind, path, step)`` of the student to score: a checked run checkpoint or a ``--model`` spec.

    ``step`` is the checkpoint's step (None for a model directory without a run checkpoint's metadata).

    Raises:
        DistillError: the path does not exist, holds no complete checkpoint, a checkpoint fails its size
            checks or has no ``model_dist/``, or the ``--model`` prefix is unknown.
    """
    # torch-free CLI path: the checkpoint module imports torch, which `distill --help` must not load
    from distill_plugins.checkpoint.run_checkpoint import METADATA, find_latest_checkpoint, list_checkpoints, \
        read_metadata, validate_checkpoint

    if model is not None:
        kind, sep, raw = model.partition(":")
        if not sep or kind not in MODEL_KINDS or not raw:
            raise DistillError(f"--model {model!r}: expected hf:DIR, megatron:DIR or checkpoint:DIR")
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise DistillError(f"--model {model!r}: no such directory {path}")
        if kind == "hf" and not (path / "config.json").is_file():
            raise DistillError(f"--model {model!r}: {path} has no config.json; export a checkpoint with "
                               f"`distill export CHECKPOINT {path}` or point at a Hugging Face model directory")
        if kind == "hf" or not (path / METADATA).is_file():
            return kind, path, None
        checkpoint, model_kind = str(path), kind
    else:
        model_kind = "checkpoint"
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise DistillError(f"--checkpoint {checkpoint!r}: no such directory; give a step_N checkpoint, a directory "
                           "of them (checkpoint.dir) or a run directory")
    if not (path / METADATA).is_file():
        roots = [r for r in (path, path / "checkpoints") if r.is_dir() and list_checkpoints(r)]
        found = find_latest_checkpoint(roots[0]) if roots else None
        if found is None:
            where = f"{roots[0]} holds checkpoints but none is complete" if roots else \
                f"no step_N/{METADATA} in {path} or {path / 'checkpoints'}"
            raise DistillError(f"--checkpoint {checkpoint!r}: {where}; did the run save one (checkpoint.interval, "
                               "or the save at its last step)?")
        path = found
    problem = validate_checkpoint(path)
    if problem is not None:
        raise DistillError(f"--checkpoint {str(path)!r} cannot be loaded: {problem}")
    meta = read_metadata(path)
    if not meta.get("model_dist"):
        raise DistillError(f"--checkpoint {str(path)!r} has no model_dist/ (the layout-free copy of the student "
                           "the evaluation loads); resume the run with this version and let it save again")
    return model_kind, path, int(meta.get("step", 0))


def run_eval(args: argparse.Namespace) -> int:
    # torch-free CLI path: the engine (torch, megatron-core) loads only when this command runs
    from distill_plugins.checkpoint.run_checkpoint import check_writable
    from distill_plugins.data.instruct import InstructMicrobatchIterator, instruct_tokenizer
    from distill_plugins.data.stream import rank0_first
    from distill_plugins.engine import process_groups
    from distill_plugins.engine.callbacks import MetricsLog, global_rank
    from distill_plugins.engine.cpu import disable_cpu_mode, enable_cpu_mode
    from distill_plugins.engine.evaluation import check_instruct_recipe, evaluate_instruct, held_out_source
    from distill_plugins.engine.run import Engine
    from distill_plugins.recipe.load import load_recipe

    overrides = list(args.overrides)
    if args.cpu:
        overrides.append("device=cpu")
    recipe, host = load_recipe(args.recipe, overrides)
    check_instruct_recipe(recipe)
    for flag, value in (("--num-examples", args.num_examples), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise DistillError(f"{flag} {value}: expected an integer >= 1")
    kind, path, step = student_source(args.checkpoint, args.model)
    out_dir = Path(args.output_dir or recipe.output_dir)
    check_writable([("--output-dir" if args.output_dir else "output_dir", out_dir)])
    sources = {key: None for key in MODEL_KINDS}
    sources[kind] = str(path)
    student = dataclasses.replace(recipe.student, **sources)
    recipe = dataclasses.replace(recipe, student=student, teacher_parallel=None,
                                 checkpoint=dataclasses.replace(recipe.checkpoint, resume="none"))
    cpu = recipe.device == "cpu"
    if cpu:
        enable_cpu_mode()
    ctx = process_groups.initialize(recipe.parallel, seed=recipe.seed, cpu=cpu)
    try:
        tokenizer = rank0_first(lambda: instruct_tokenizer(recipe))
        source = held_out_source(recipe, args.split, tokenizer=tokenizer)
        # the engine's data iterator: the held-out split itself (no training step runs, no train split is read)
        data = InstructMicrobatchIterator(source, micro_batch_size=recipe.training.micro_batch_size,
                                          dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, kind="instruct", split=args.split)
        engine = Engine(recipe, host, cpu=cpu, data=data)
        max_new = args.max_new_tokens or recipe.training.eval_max_new_tokens
        result = evaluate_instruct(engine, source=source, num_examples=args.num_examples, max_new_tokens=max_new,
                                   generate_answers=not args.no_generate, generation_batch_size=args.batch_size,
                                   keep_examples=True, tokenizer=tokenizer)
        step = 0 if step is None else step
        if global_rank() == 0:
            teacher = "none (loss.kd_weight is 0)" if engine.trainer.stage.teacher is None else \
                _describe_model(engine.recipe.teacher)
            report = {"step": step, "recipe": str(args.recipe), "student": f"{kind}:{path}", "teacher": teacher,
                      "split": result.split, "greedy": True, "max_new_tokens": result.max_new_tokens,
                      "layout": {"tp": recipe.parallel.tensor, "pp": recipe.parallel.pipeline, "dp": ctx.dp_size},
                      "metrics": result.metrics, "examples": result.examples}
            out_file = Path(args.output) if args.output else out_dir / f"eval_step_{step}.json"
            out_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_file.with_name(out_file.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, out_file)
            MetricsLog(out_dir, writer=True).append({"step": step, **result.metrics})
            for line in summary_lines(report):
                print(line)
            print(f"wrote {out_file} and a line in {out_dir / MetricsLog.FILE}")
    finally:
        process_groups.destroy()
        if cpu:  # in-process callers (tests, notebooks) get torch back as it was
            disable_cpu_mode()
    return 0


def _describe_model(spec) -> str:
    for kind in MODEL_KINDS:
        if getattr(spec, kind):
            return f"{kind}:{getattr(spec, kind)}"
    return "random initialisation (no teacher.hf / megatron / checkpoint)"


def summary_lines(report: dict) -> list[str]:
    """The table ``distill eval`` prints: one figure per line."""
    m = report["metrics"]

    def fmt(key: str, digits: int = 4) -> str:
        value = m.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [f"distill eval: {report['student']} (step {report['step']}), {int(m['eval_examples'])} examples of the "
             f"{report['split']} split, teacher {report['teacher']}",
             f"  response CE            {fmt('eval_response_ce')} nats/token over {int(m['eval_response_tokens'])} "
             f"response tokens (teacher {fmt('eval_teacher_response_ce')})",
             f"  KL(teacher || student) {fmt('eval_kl')} nats/token"]
    if m.get("eval_rouge_l") is not None:
        lines.append(f"  ROUGE-L F1             {fmt('eval_rouge_l', 2)} (greedy, max_new_tokens="
                     f"{report['max_new_tokens']}; {fmt('eval_answer_tokens', 1)} tokens per answer, "
                     f"{100 * m['eval_eos_fraction']:.0f}% ended with EOS, {fmt('eval_generate_s', 1)} s)")
    return lines
