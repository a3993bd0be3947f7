"""Benchmark of the last stage's output layer + KD loss + student CE: fused vs materialised logits.

Usage::

    .venv/bin/python benchmarks/fused_output_layer.py                  # V in {32768, 131072}, N=4096, TP in {1, 2}
    .venv/bin/python benchmarks/fused_output_layer.py --quick          # small sizes, a smoke test
    .venv/bin/python benchmarks/fused_output_layer.py --vocab 131072 --tp 1
    .venv/bin/python benchmarks/fused_output_layer.py --quick --device cuda

For every (V, TP) one set of processes (``distill_plugins.testing.distributed``,
gloo; one per TP rank) holds random hidden states ``h_S [N, H_S]``,
``h_T [N, H_T]`` and this rank's output-layer shards ``W [V/TP, H]`` (the
vocabulary padded to a multiple of 128 x TP, the real size ``V - 13`` so padding
is exercised; a few rows carry label -100) and times, back to back in the same
processes, forward + backward of:

* ``materialised``: ``z = h W^T`` for both models (the student's through
  megatron's copy-to-TP region), then the engine's loss glue
  :func:`distill_plugins.engine.loss.distill_loss` (objective + student CE, which
  makes its fp32 copy of the logits);
* ``fused``: :func:`distill_plugins.engine.fused_loss.fused_distill_loss` (the
  engine's fused output layer) on the hidden states and the shards (chunks of ``--chunk-rows`` rows, default
  :func:`~distill_plugins.objectives.fused.default_chunk_rows`).

Time: median wall time over ``--reps`` repetitions after ``--warmup`` ones, with
a barrier before and after (the slowest rank's); the two methods alternate
within each repetition, so a drift in machine load hits both alike. Peak extra
memory: :class:`_harness.PeakMemory` (process RSS peak on CPU, the caching
allocator's on CUDA), maximum over ranks. Both include the gradients of ``h_S`` and
``W_S`` every method produces. Accuracy (fp32): the maximum relative difference
``max|a - b| / max|b|`` of the loss, ``dL/dh_S`` and ``dL/dW_S`` between the two.

On CUDA the processes use ``cuda:<rank>`` and gloo for the TP collectives (fine
at TP=1; at TP>1 the collectives are slower than NCCL's, so compare at TP=1).
Prints a table and writes JSON to ``benchmarks/results/fused_output_layer.json``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
# _harness first: it puts the repository on sys.path for a bare checkout
from _harness import (PeakMemory, benchmark_parser, check_device, fmt_bytes, machine_info, set_megatron_tp_group,
                      worker_device, write_report)

from distill_plugins.testing.distributed import run_distributed

METHODS = ("materialised", "fused")


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary padded to a multiple of 128 x TP (megatron's make_vocab_size_divisible_by=128)."""
    step = 128 * tp
    return -(-vocab // step) * step


# --------------------------------------------------------------------------- worker


def bench_worker(rank: int, tp: int, cfg: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from distill_plugins import build_objective
    from distill_plugins.engine.loss import LossParts, distill_loss
    from distill_plugins.engine.fused_loss import fused_distill_loss
    from distill_plugins.objectives.fused import default_chunk_rows, replicated_input

    torch.set_num_threads(cfg["threads"])
    device = worker_device(cfg["device"], rank)
    group = dist.group.WORLD if tp > 1 else None
    if group is not None:  # megatron's vocab_parallel_cross_entropy (the materialised CE) reads parallel_state
        set_megatron_tp_group(group, rank, tp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    vocab, n, hs_dim, ht_dim = cfg["vocab"], cfg["tokens"], cfg["hidden"], cfg["teacher_hidden"]
    padded = padded_vocab(vocab, tp)
    real = vocab - 13
    v_local = padded // tp
    gen = torch.Generator().manual_seed(1234)  # the same full tensors on every rank; each keeps its shard
    h_s = torch.randn(n, hs_dim, generator=gen)
    h_t = torch.randn(n, ht_dim, generator=gen)
    cols = slice(rank * v_local, (rank + 1) * v_local)
    w_s = (torch.randn(padded, hs_dim, generator=gen) * (2.0 / hs_dim ** 0.5))[cols].contiguous()
    w_t = (torch.randn(padded, ht_dim, generator=gen) * (3.0 / ht_dim ** 0.5))[cols].contiguous()
    labels = torch.randint(0, real, (n,), generator=gen)
    labels[::97] = -100
    h_s, h_t, w_s, w_t, labels = (x.to(device) for x in (h_s, h_t, w_s, w_t, labels))
    h_s, h_t, w_s, w_t = (x.to(dtype) for x in (h_s, h_t, w_s, w_t))
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    parts = LossParts(objective=build_objective(cfg["objective"]), kd_weight=1.0, ce_weight=cfg["ce_weight"])
    chunk_rows = cfg["chunk_rows"] or default_chunk_rows(v_local)

    def materialised():
        zs = torch.matmul(replicated_input(h_s, group), w_s.t())
        with torch.no_grad():
            zt = torch.matmul(h_t, w_t.t())
        loss, _, report = distill_loss(zs, zt, labels, parts, tp_group=group, vocab_size=real)
        del zs, zt
        loss.backward()
        return loss.detach(), report

    def fused():
        loss, _, report = fused_distill_loss(h_s, w_s, h_t, w_t, labels, parts, tp_group=group, vocab_size=real,
                                             chunk_rows=chunk_rows)
        loss.backward()
        return loss.detach(), report

    fns = {"materialised": materialised, "fused": fused}
    memory = PeakMemory(device)
    out: dict[str, Any] = {"v_local": v_local, "padded_vocab": padded, "real_vocab": real, "chunk_rows": chunk_rows}
    results: dict[str, Any] = {}
    times: dict[str, list] = {name: [] for name in cfg["order"]}
    peaks: dict[str, list] = {name: [] for name in cfg["order"]}
    for rep in range(cfg["warmup"] + cfg["reps"]):
        for name in cfg["order"]:  # interleaved, so a change in machine load hits both methods alike
            h_s.grad = w_s.grad = None
            memory.start()
            if group is not None:
                dist.barrier(group)
            t0 = time.perf_counter()
            loss, report = fns[name]()
            memory.sync()
            if group is not None:
                dist.barrier(group)
            elapsed = time.perf_counter() - t0
            peak = memory.peak_extra()
            if rep >= cfg["warmup"]:
                times[name].append(elapsed)
                peaks[name].append(peak)
            if rep == cfg["warmup"] + cfg["reps"] - 1:
                results[name] = (loss, h_s.grad.detach().clone(), w_s.grad.detach().clone(), report)
            h_s.grad = w_s.grad = None
    for name in cfg["order"]:
        report = results[name][3]
        out[name] = {"time_s": statistics.median(times[name]), "times_s": times[name],
                     "peak_extra_bytes": max(peaks[name]), "kd_loss": float(report["kd_sum"] / report["kd_count"]),
                     "ce_loss": float(report["ce_sum"] / report["ce_count"])}

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    (lf, ghf, gwf, rf), (lm, ghm, gwm, rm) = results["fused"], results["materialised"]
    out["max_rel_diff"] = {"loss": rel(lf, lm), "grad_hidden": rel(ghf, ghm), "grad_weight": rel(gwf, gwm),
                           "ce_sum": rel(rf["ce_sum"], rm["ce_sum"]), "kd_sum": rel(rf["kd_sum"], rm["kd_sum"])}
    return out


# --------------------------------------------------------------------------- report


def _targets(runs: list[dict]) -> dict:
    checks = []
    for r in runs:
        if r["vocab"] >= 131072 and r["tokens"] >= 4096:
            checks.append({"target": f"peak extra memory fused/materialised, V={r['vocab']}, N={r['tokens']}, "
                                     f"TP={r['tp']}", "value": r["memory_ratio"], "limit": 0.25,
                           "met": r["memory_ratio"] <= 0.25})
            checks.append({"target": f"time fused/materialised, V={r['vocab']}, N={r['tokens']}, TP={r['tp']}",
                           "value": r["time_ratio"], "limit": 1.15, "met": r["time_ratio"] <= 1.15})
        if r["dtype"] == "fp32":
            worst = max(r["max_rel_diff"][k] for k in ("loss", "grad_hidden", "grad_weight"))
            checks.append({"target": f"max relative difference (loss, dL/dh, dL/dW), V={r['vocab']}, TP={r['tp']}",
                           "value": worst, "limit": 1e-5, "met": worst <= 1e-5})
    return {"checks": checks, "all_met": all(c["met"] for c in checks)}


def print_report(report: dict) -> None:
    cfg = report["config"]
    print(f"objective {cfg['objective']}, ce_weight {cfg['ce_weight']}, {cfg['dtype']}, device {cfg['device']}, "
          f"H_S={cfg['hidden']}, H_T={cfg['teacher_hidden']}")
    print(f"{'V':>7}{'N':>6}{'TP':>4}{'chunk':>7}{'materialised ms':>17}{'fused ms':>11}{'time x':>8}"
          f"{'mat. peak':>12}{'fused peak':>12}{'mem x':>7}{'rel diff loss/dh/dW':>26}")
    for r in report["runs"]:
        d = r["max_rel_diff"]
        print(f"{r['vocab']:>7}{r['tokens']:>6}{r['tp']:>4}{r['chunk_rows']:>7}"
              f"{1e3 * r['materialised']['time_s']:>17.0f}{1e3 * r['fused']['time_s']:>11.0f}{r['time_ratio']:>8.2f}"
              f"{fmt_bytes(r['materialised']['peak_extra_bytes']):>12}{fmt_bytes(r['fused']['peak_extra_bytes']):>12}"
              f"{r['memory_ratio']:>7.2f}   {d['loss']:.1e}/{d['grad_hidden']:.1e}/{d['grad_weight']:.1e}")
    print("\nTargets (issue 16):")
    for c in report["targets"]["checks"]:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}: {c['value']:.3g} (limit {c['limit']})")


def main(argv: list[str] | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    p = benchmark_parser(__doc__, name="fused_output_layer", tokens_help="token rows N (default 4096; quick 512)",
                         reps_help="timed repetitions (default 2; quick 2)")
    p.add_argument("--hidden", type=int, help="student hidden size (default 1024; quick 256)")
    p.add_argument("--teacher-hidden", type=int, help="teacher hidden size (default 1024; quick 384)")
    p.add_argument("--objective", default="forward_kl", help="registered objective (default forward_kl)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the student CE (0: logged only)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per fused chunk (default: the library's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--order", choices=["materialised-first", "fused-first"], default="materialised-first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank (default 1, as benchmarks/objectives.py)")
    args = p.parse_args(argv)
    vocabs = args.vocab or ([4096] if args.quick else [32768, 131072])
    tokens = args.tokens or (512 if args.quick else 4096)
    tps = args.tp or [1, 2]
    check_device(p, args.device, tps)
    cfg_base = {"tokens": tokens, "hidden": args.hidden or (256 if args.quick else 1024),
                "teacher_hidden": args.teacher_hidden or (384 if args.quick else 1024), "objective": args.objective,
                "ce_weight": args.ce_weight, "chunk_rows": args.chunk_rows, "dtype": args.dtype,
                "device": args.device, "reps": args.reps or 2, "warmup": args.warmup,
                "order": list(METHODS) if args.order == "materialised-first" else list(reversed(METHODS))}
    runs = []
    start = time.time()
    for vocab in vocabs:
        for tp in tps:
            t0 = time.time()
            cfg = dict(cfg_base, vocab=vocab, threads=args.threads)
            per_rank = run_distributed(bench_worker, tp, args=(cfg,), timeout=7200)
            run: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "tp": tp, "dtype": args.dtype,
                                   "chunk_rows": per_rank[0]["chunk_rows"], "v_local": per_rank[0]["v_local"],
                                   "padded_vocab": per_rank[0]["padded_vocab"],
                                   "real_vocab": per_rank[0]["real_vocab"]}
            for name in METHODS:
                rows = [r[name] for r in per_rank]
                run[name] = {"time_s": max(r["time_s"] for r in rows), "times_s": rows[0]["times_s"],
                             "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rows),
                             "kd_loss": rows[0]["kd_loss"], "ce_loss": rows[0]["ce_loss"]}
            run["max_rel_diff"] = {k: max(r["max_rel_diff"][k] for r in per_rank) for k in per_rank[0]["max_rel_diff"]}
            run["time_ratio"] = run["fused"]["time_s"] / run["materialised"]["time_s"]
            run["memory_ratio"] = run["fused"]["peak_extra_bytes"] / max(1, run["materialised"]["peak_extra_bytes"])
            run["load_average_1m"] = os.getloadavg()[0]
            run["wall_s"] = time.time() - t0
            runs.append(run)
            print(f"[V={vocab} N={tokens} TP={tp} done in {time.time() - t0:.0f} s]", flush=True)
    report = {
        "config": dict(cfg_base, vocabs=vocabs, tps=tps, quick=args.quick, backend="gloo"),
        "machine": machine_info(args.device),
        "runs": runs,
        "elapsed_s": time.time() - start,
    }
    report["targets"] = _targets(runs)
    print_report(report)
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
