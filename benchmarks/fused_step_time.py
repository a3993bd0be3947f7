"""End-to-end optimizer step time and peak memory: fused output layer vs materialised logits, one CPU process.

Usage::

    .venv/bin/python benchmarks/fused_step_time.py                       # V=32768, the defaults below
    .venv/bin/python benchmarks/fused_step_time.py --quick               # small sizes, a smoke test
    .venv/bin/python benchmarks/fused_step_time.py --vocab 65536 --steps 6

Builds two engines from ``recipes/tiny/base.yaml`` in one process (TP=1, PP=1, fp32,
CPU), the same seeds, weights and synthetic batches, one with
``loss.fused_output_layer: true`` and one with ``false``, with the shapes given by
the options (student ``--layers`` x ``--hidden``, teacher ``--teacher-layers`` x
``--teacher-hidden``, vocabulary ``--vocab``, ``--seq`` tokens per sequence, 2
sequences per microbatch, ``--microbatches`` per step), and runs whole optimizer steps
(``Trainer.train_step``: megatron's schedule, forward and backward of both models,
loss, optimizer), alternating the two engines step by step so a change in machine
load hits both alike. Reports the median ``step_time_s`` (wall) and the median CPU
time of the process during the step (``time.process_time``: one process, so it is
the step's work and, unlike the wall time, hardly moves with the machine's load) of
the timed steps (after ``--warmup``), the ratios fused / materialised, the loss of every step of both (they
agree to ~1e-7 relative in fp32) and the peak resident set each engine's steps add
(``_harness.PeakMemory``, measured on the last timed step of each). Writes JSON to
``benchmarks/results/fused_step_time.json``.

No ModelOpt: ``nvidia-modelopt`` is not installed in this environment, so the
comparison is this engine against itself with the logits materialised (the
engine's path before the fused output layer).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
# _harness first: it puts the repository on sys.path for a bare checkout
from _harness import ROOT, PeakMemory, fmt_bytes, machine_info, write_report

from distill_plugins.engine.cpu import enable_cpu_mode
from distill_plugins.engine.run import Engine
from distill_plugins.manager import build_plugin_host
from distill_plugins.recipe.load import load_recipe

RECIPE = ROOT / "recipes" / "tiny" / "base.yaml"


def _overrides(args: argparse.Namespace, fused: bool, out: str) -> list[str]:
    return [f"student.vocab_size={args.vocab}", f"teacher.vocab_size={args.vocab}",
            f"student.num_layers={args.layers}", f"student.hidden_size={args.hidden}",
            f"teacher.num_layers={args.teacher_layers}", f"teacher.hidden_size={args.teacher_hidden}",
            f"student.max_position_embeddings={args.seq}", f"teacher.max_position_embeddings={args.seq}",
            f"data.seq_length={args.seq}", "training.micro_batch_size=2",
            f"training.global_batch_size={2 * args.microbatches}", f"training.steps={args.warmup + args.steps}",
            "training.warmup_steps=0", f"loss.ce_weight={args.ce_weight}", f"objective={args.objective}",
            f"loss.fused_output_layer={'true' if fused else 'false'}", "checkpoint.interval=0",
            "checkpoint.resume=none", f"output_dir={out}"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")  # megatron's import chatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 32768; quick 4096)")
    p.add_argument("--hidden", type=int, help="student hidden size (default 256; quick 64)")
    p.add_argument("--teacher-hidden", type=int, help="teacher hidden size (default 512; quick 128)")
    p.add_argument("--layers", type=int, default=2, help="student layers (default 2)")
    p.add_argument("--teacher-layers", type=int, default=4, help="teacher layers (default 4)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 512; quick 64)")
    p.add_argument("--microbatches", type=int, default=2, help="microbatches of 2 sequences per step (default 2)")
    p.add_argument("--steps", type=int, help="timed steps per engine (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--objective", default="forward_kl", help="registered objective (default forward_kl)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="loss.ce_weight (the CE is logged either way)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fused_step_time.json"))
    args = p.parse_args(argv)
    args.vocab = args.vocab or (4096 if args.quick else 32768)
    args.hidden = args.hidden or (64 if args.quick else 256)
    args.teacher_hidden = args.teacher_hidden or (128 if args.quick else 512)
    args.seq = args.seq or (64 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    enable_cpu_mode()
    host = build_plugin_host()
    engines = {}
    for name, fused in (("materialised", False), ("fused", True)):
        recipe, _ = load_recipe(RECIPE, _overrides(args, fused, f"/tmp/fused_step_time/{name}"), host=host)
        engines[name] = Engine(recipe, host, cpu=True)
        assert engines[name].trainer.stage.fused == fused
    times: dict[str, list] = {k: [] for k in engines}
    cpu: dict[str, list] = {k: [] for k in engines}
    losses: dict[str, list] = {k: [] for k in engines}
    peaks: dict[str, int] = {}
    memory = PeakMemory(torch.device("cpu"))
    start = time.time()
    for step in range(args.warmup + args.steps):
        for name, eng in engines.items():  # alternating, so a change in load hits both alike
            last = step == args.warmup + args.steps - 1
            if last:
                memory.start()
            c0 = time.process_time()
            metrics = eng.trainer.train_step().metrics
            c1 = time.process_time()
            if last:
                peaks[name] = memory.peak_extra()
            losses[name].append(metrics["loss"])
            if step >= args.warmup:
                times[name].append(metrics["step_time_s"])
                cpu[name].append(c1 - c0)
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["fused"], losses["materialised"]))
    tokens = 2 * args.microbatches * args.seq
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"recipe": str(RECIPE.relative_to(ROOT)),
                                                                         "tokens_per_step": tokens},
        "machine": machine_info("cpu"),
        "median_step_time_s": median, "step_times_s": times, "losses": losses,
        "time_ratio_fused_over_materialised": median["fused"] / median["materialised"],
        "median_step_cpu_s": median_cpu, "step_cpu_s": cpu,
        "cpu_ratio_fused_over_materialised": median_cpu["fused"] / median_cpu["materialised"],
        "peak_extra_bytes_last_step": peaks,
        "memory_ratio_fused_over_materialised": peaks["fused"] / max(1, peaks["materialised"]),
        "max_rel_loss_diff": worst, "elapsed_s": time.time() - start,
    }
    print(f"V={args.vocab} student {args.layers}x{args.hidden}, teacher {args.teacher_layers}x{args.teacher_hidden}, "
          f"{tokens} tokens/step, {args.steps} timed steps, CPU, 1 process, {args.threads} thread(s)")
    for name in engines:
        print(f"  {name:<13} median step {median[name]:.3f} s wall, {median_cpu[name]:.3f} s CPU   "
              f"peak extra (last step) {fmt_bytes(peaks[name])}")
    print(f"  fused / materialised: time {report['time_ratio_fused_over_materialised']:.2f}x wall, "
          f"{report['cpu_ratio_fused_over_materialised']:.2f}x CPU, "
          f"memory {report['memory_ratio_fused_over_materialised']:.2f}x; max relative loss difference {worst:.1e}")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
