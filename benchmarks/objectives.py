"""Benchmark of the vocab-parallel objectives: time, peak extra memory and bytes reduced per token.

Usage::

    .venv/bin/python benchmarks/objectives.py            # V in {32768, 131072}, T=2048, TP in {1, 2}
    .venv/bin/python benchmarks/objectives.py --quick    # small sizes, a smoke test
    .venv/bin/python benchmarks/objectives.py --quick --device cuda   # the same on GPUs (cuda:<rank>)

For every (V, TP) one set of gloo processes (``distill_plugins.testing.distributed``)
holds random fp32 logit shards ``[T, V / TP]`` and times forward + backward of:

* ``ours:<objective>``: the built-in fused objectives (``tp_group`` = the TP group);
* ``gather:<objective>``: all-gather both shards, then the same loss computed densely
  with plain torch ops on the full vocabulary (the naive approach);
* ``modelopt:forward_kl``: nvidia-modelopt's Megatron ``LogitsKLLoss`` when the package
  imports (its per-rank partial loss is completed with one ``[T]`` SUM all-reduce);
* ``megatron_ce``: megatron-core's ``vocab_parallel_cross_entropy`` on the student shard
  with random targets, the floor (one exponential pass, in place).

Time: median wall time over ``--reps`` repetitions (after one warm-up) with a
barrier before and after, so it is the slowest rank's. Peak extra memory:
:class:`_harness.PeakMemory` (the rise of the process's peak resident set on CPU,
the caching allocator's on CUDA), maximum over ranks; it includes the gradient
buffer every method allocates. Bytes per token: payload of every ``all_reduce`` (forward and
backward) and the received part of every ``all_gather``, divided by T.

``--device cuda``: rank ``r`` works on ``cuda:r``; time is measured after a
``torch.cuda.synchronize()``. The
collectives still go through gloo (which handles CUDA tensors), so at TP>1 they
are slower than NCCL's; compare methods at the same TP.

Also: CSD's O(V) kernel against its O(V^2) pair form at a small V, on one process.
Prints a table and writes JSON to ``benchmarks/results/objectives.json``.
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

OURS = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "logit_mse",
        "csd", "csd_US", "csd_TS"]
PARAMS = {"csd": {"w1": "S", "w2": "S"}, "csd_US": {"w1": "U", "w2": "S"}, "csd_TS": {"w1": "T", "w2": "S"}}
GATHERED = ["forward_kl", "csd"]


# --------------------------------------------------------------------------- measurement helpers


class _ByteCounter:
    """Counts collective payload bytes by wrapping torch.distributed's functions."""

    def __init__(self):
        self.bytes = 0
        self._orig = {}

    def install(self):
        counter = self
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, __orig=orig, __name=name, **kwargs):
                counter._count(__name, args, kwargs)
                return __orig(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def _count(self, name, args, kwargs):
        group = kwargs.get("group")
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if name == "all_reduce":
            x = args[0] if args else kwargs["tensor"]
            self.bytes += x.numel() * x.element_size()
        elif name == "all_gather":
            x = args[1] if len(args) > 1 else kwargs["tensor"]
            self.bytes += (world - 1) * x.numel() * x.element_size()
        else:
            x = args[1] if len(args) > 1 else kwargs["input_tensor"]
            self.bytes += (world - 1) * x.numel() * x.element_size()


# --------------------------------------------------------------------------- methods


def _dense_loss(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Dense per-token loss on full-vocabulary fp32 logits (the gather-then-compute baseline)."""
    logq = torch.log_softmax(s, -1)
    logp = torch.log_softmax(t, -1)
    if name == "forward_kl":
        return torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    if name == "csd":  # (S, S): Var_q(d) with detached weights
        w = logq.detach().exp()
        d = s - t
        m = (w * d).sum(-1, keepdim=True)
        return (w * d * d).sum(-1) - m.squeeze(-1) ** 2
    raise KeyError(name)


def _make_methods(group, rank: int, tp: int, v_local: int, tokens: int, have_modelopt: bool, gather: bool,
                  device: torch.device = torch.device("cpu")):
    """name -> fn(student_leaf, teacher) returning a scalar to back-propagate."""
    import distill_plugins

    host = distill_plugins.build_plugin_host()
    methods = {}
    for key in OURS:
        obj = host.build("objective", key.split("_")[0] if key.startswith("csd") else key, PARAMS.get(key, {}))
        methods[f"ours:{key}"] = lambda x, t, obj=obj: obj(x, t, tp_group=group).sum()

    def gathered(name):
        def fn(x, t):
            if group is None:
                full_s = x.detach().requires_grad_(True)
                full_t = t
            else:
                parts = [torch.empty_like(x) for _ in range(tp)]
                dist.all_gather(parts, x.detach().contiguous(), group=group)
                full_s = torch.cat(parts, -1).requires_grad_(True)
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=group)
                full_t = torch.cat(parts, -1)
            loss = _dense_loss(name, full_s, full_t).sum()
            (grad,) = torch.autograd.grad(loss, full_s)
            cols = slice(rank * v_local, (rank + 1) * v_local)
            return (x * grad[:, cols]).sum()  # d/dx = the gradient slice: one cheap extra pass
        return fn

    if gather:
        for name in GATHERED:
            methods[f"gather:{name}"] = gathered(name)

    if have_modelopt:
        from types import SimpleNamespace

        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        from distill_plugins.parallel import all_reduce_sum

        cfg = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=False)
        kd = LogitsKLLoss(cfg, temperature=1.0)

        def modelopt_fn(x, t):
            loss, _, _ = kd(x.unsqueeze(1), t.unsqueeze(1))  # [s, b, V] in, [b, s] partial out
            return all_reduce_sum(loss, group).sum()

        methods["modelopt:forward_kl"] = modelopt_fn

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    target = torch.randint(0, v_local * tp, (tokens, 1), generator=torch.Generator().manual_seed(1)).to(device)

    def ce(x, t):
        # fp32 input is overwritten in place by megatron: hand it a copy made outside the timing? No: x is
        # already a fresh clone per repetition, so in-place use is safe and costs nothing extra.
        return vocab_parallel_cross_entropy(x.view(tokens, 1, v_local), target).sum()

    methods["megatron_ce"] = ce
    return methods


def _modelopt_status() -> tuple[bool, str]:
    try:
        import modelopt  # noqa: F401
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report whatever stops it
        return False, f"not importable: {type(e).__name__}: {e}"
    import importlib.metadata as md

    return True, f"nvidia-modelopt {md.version('nvidia-modelopt')}"


def bench_worker(rank: int, tp: int, vocab: int, tokens: int, reps: int, only: list[str] | None,
                 gather: bool = True, skip: list[str] | None = None, device: str = "cpu"):
    import warnings

    warnings.filterwarnings("ignore")
    dev = worker_device(device, rank)
    group = dist.group.WORLD if tp > 1 else None
    set_megatron_tp_group(group, rank, tp)  # for vocab_parallel_cross_entropy and modelopt
    want_modelopt = not (skip and "modelopt:forward_kl" in skip) and (
        not only or any("modelopt:forward_kl".endswith(o) for o in only))
    have_modelopt = want_modelopt and _modelopt_status()[0]
    v_local = vocab // tp
    gen = torch.Generator().manual_seed(100 + rank)
    student = (2.0 * torch.randn(tokens, v_local, generator=gen)).to(dev)
    teacher = (2.0 * torch.randn(tokens, v_local, generator=gen)).to(dev)
    methods = _make_methods(group, rank, tp, v_local, tokens, have_modelopt, gather, dev)
    counter = _ByteCounter().install()
    memory = PeakMemory(dev)
    out = {}
    for name, fn in methods.items():
        if only and not any(name.endswith(o) or name == o for o in only):
            continue
        if skip and name in skip:
            continue
        times, peaks, nbytes = [], [], 0
        for rep in range(reps + 1):
            x = student.clone().requires_grad_(True)
            memory.start()
            counter.bytes = 0
            if group is not None:
                dist.barrier(group)
            t0 = time.perf_counter()
            fn(x, teacher).backward()
            memory.sync()
            if group is not None:
                dist.barrier(group)
            elapsed = time.perf_counter() - t0
            peak = memory.peak_extra()
            assert x.grad is not None and x.grad.shape == x.shape
            if rep:
                times.append(elapsed)
                peaks.append(peak)
                nbytes = counter.bytes
            del x
        out[name] = {"time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": max(peaks),
                     "bytes_per_token": nbytes / tokens}
    return out


def bench_pairwise(vocab: int, tokens: int, reps: int, device: str = "cpu") -> dict[str, Any]:
    """CSD (U,S) through the fused O(V) kernel against autograd through the O(V^2) pair form."""
    import distill_plugins

    obj = distill_plugins.build_objective("csd", w1="U", w2="S")
    gen = torch.Generator().manual_seed(3)
    s = (2.0 * torch.randn(tokens, vocab, generator=gen)).to(device)
    t = (2.0 * torch.randn(tokens, vocab, generator=gen)).to(device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def pair(x):
        d = x - t
        w1 = torch.full_like(d, 1.0 / vocab)
        w2 = torch.softmax(x.detach(), -1)
        return 0.5 * (w1.unsqueeze(-1) * w2.unsqueeze(-2) * (d.unsqueeze(-2) - d.unsqueeze(-1)) ** 2).sum((-1, -2))

    res = {}
    for name, fn in (("ours:csd_US", lambda x: obj(x, t)), ("pairwise:csd_US", pair)):
        times, values = [], None
        for rep in range(reps + 1):
            x = s.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = fn(x)
            loss.sum().backward()
            sync()
            if rep:
                times.append(time.perf_counter() - t0)
            values = (loss.detach(), x.grad)
        res[name] = {"time_s": statistics.median(times), "value": values}
    (a, ga), (b, gb) = res["ours:csd_US"].pop("value"), res["pairwise:csd_US"].pop("value")
    res["max_abs_value_diff"] = (a - b).abs().max().item()
    res["max_abs_grad_diff"] = (ga - gb).abs().max().item()
    res["speedup"] = res["pairwise:csd_US"]["time_s"] / res["ours:csd_US"]["time_s"]
    res["vocab"], res["tokens"] = vocab, tokens
    return res


# --------------------------------------------------------------------------- report


def _targets(runs: list[dict], vocabs: list[int]) -> dict[str, Any]:
    """Evaluate issue 3's targets on the measured runs."""
    by = {(r["vocab"], r["tp"]): r["methods"] for r in runs}
    checks = []

    def add(name, value, limit, ok):
        checks.append({"target": name, "value": value, "limit": limit, "met": bool(ok)})

    for v in vocabs:
        m = by.get((v, 2))
        if not m:
            continue
        for ours in ("forward_kl", "csd"):
            mo = m.get("modelopt:forward_kl")
            if mo and f"ours:{ours}" in m:
                rt = m[f"ours:{ours}"]["time_s"] / mo["time_s"]
                rm = m[f"ours:{ours}"]["peak_extra_bytes"] / max(1, mo["peak_extra_bytes"])
                add(f"{ours} time / modelopt LogitsKLLoss, V={v}, TP=2", rt, 0.7, rt <= 0.7)
                add(f"{ours} peak extra memory / modelopt, V={v}, TP=2", rm, 0.3, rm <= 0.3)
            ce = m.get("megatron_ce")
            if ce and f"ours:{ours}" in m:
                r = m[f"ours:{ours}"]["time_s"] / ce["time_s"]
                add(f"{ours} time / megatron vocab_parallel_cross_entropy, V={v}, TP=2", r, 4.0, r <= 4.0)
    if len(vocabs) >= 2:
        lo, hi = min(vocabs), max(vocabs)
        for tp in (1, 2):
            if (lo, tp) in by and (hi, tp) in by:
                for ours in ("forward_kl", "csd"):
                    key = f"ours:{ours}"
                    if key in by[(lo, tp)] and key in by[(hi, tp)]:
                        r = by[(hi, tp)][key]["time_s"] / by[(lo, tp)][key]["time_s"]
                        expect = hi / lo
                        add(f"{ours} time(V={hi}) / time(V={lo}), TP={tp}", r, [0.85 * expect, 1.15 * expect],
                            0.85 * expect <= r <= 1.15 * expect)
    for key in {k for r in runs for k in r["methods"] if k.startswith("ours:")}:
        per_tok = {(r["vocab"], r["tp"]): r["methods"][key]["bytes_per_token"] for r in runs
                   if r["tp"] > 1 and key in r["methods"]}
        if len(per_tok) >= 2:
            vals = sorted(set(per_tok.values()))
            add(f"{key} bytes per token independent of V", vals, "equal", len(vals) == 1)
    return {"checks": checks, "all_met": all(c["met"] for c in checks)}


def print_report(report: dict[str, Any]) -> None:
    print(f"modelopt: {report['modelopt']}")
    for run in report["runs"]:
        m = run["methods"]
        base = m.get("modelopt:forward_kl") or m.get("gather:forward_kl")
        base_name = "modelopt" if "modelopt:forward_kl" in m else "gather:forward_kl"
        ce = m.get("megatron_ce")
        print(f"\nV={run['vocab']}  T={run['tokens']}  TP={run['tp']}   (ratios: time vs {base_name}, "
              f"time vs megatron_ce, memory vs {base_name})")
        print(f"{'method':<24}{'median ms':>11}{'x ' + base_name[:8]:>12}{'x CE':>8}{'peak extra':>13}"
              f"{'x mem':>8}{'bytes/token':>13}")
        for name, r in m.items():
            rt = r["time_s"] / base["time_s"] if base else float("nan")
            rc = r["time_s"] / ce["time_s"] if ce else float("nan")
            rm = r["peak_extra_bytes"] / max(1, base["peak_extra_bytes"]) if base else float("nan")
            print(f"{name:<24}{1e3 * r['time_s']:>11.1f}{rt:>12.2f}{rc:>8.2f}"
                  f"{fmt_bytes(r['peak_extra_bytes']):>13}{rm:>8.2f}{r['bytes_per_token']:>13.0f}")
    pw = report.get("pairwise")
    if pw:
        print(f"\nCSD (U,S) O(V) vs O(V^2) pair form, V={pw['vocab']}, T={pw['tokens']}, one process: "
              f"{1e3 * pw['ours:csd_US']['time_s']:.1f} ms vs {1e3 * pw['pairwise:csd_US']['time_s']:.1f} ms "
              f"({pw['speedup']:.0f}x), max |value diff| {pw['max_abs_value_diff']:.2e}, "
              f"max |grad diff| {pw['max_abs_grad_diff']:.2e}")
    print("\nTargets (issue 3):")
    for c in report["targets"]["checks"]:
        value = c["value"] if isinstance(c["value"], list) else f"{c['value']:.3f}"
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}: {value} (limit {c['limit']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")  # megatron / modelopt import chatter
    p = benchmark_parser(__doc__, name="objectives", tokens_help="token rows T (default 2048; quick 64)",
                         reps_help="timed repetitions (default 5; quick 1)")
    p.add_argument("--only", nargs="+", help="run only methods whose name ends with one of these")
    p.add_argument("--skip", nargs="+", help="method names to leave out (e.g. modelopt:forward_kl)")
    p.add_argument("--gather-max-vocab", type=int, default=32768,
                   help="skip the gather-then-compute baseline above this V (it needs ~10 full-vocab fp32 "
                        "[T, V] tensors per rank; default 32768)")
    args = p.parse_args(argv)
    vocabs = args.vocab or ([4096] if args.quick else [32768, 131072])
    tokens = args.tokens or (64 if args.quick else 2048)
    tps = args.tp or [1, 2]
    check_device(p, args.device, tps)
    reps = args.reps or (1 if args.quick else 5)
    if args.skip and "modelopt:forward_kl" in args.skip:
        ok, modelopt = False, "skipped (--skip modelopt:forward_kl)"
    else:
        ok, modelopt = _modelopt_status()
    runs = []
    start = time.time()
    for vocab in vocabs:
        for tp in tps:
            run_start = time.time()
            gather = vocab <= args.gather_max_vocab
            per_rank = run_distributed(bench_worker, tp, args=(vocab, tokens, reps, args.only, gather, args.skip,
                                                              args.device))
            methods = {}
            for name in per_rank[0]:
                rows = [r[name] for r in per_rank]
                methods[name] = {
                    "time_s": max(r["time_s"] for r in rows),
                    "times_s": rows[0]["times_s"],
                    "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rows),
                    "bytes_per_token": rows[0]["bytes_per_token"],
                }
            runs.append({"vocab": vocab, "tokens": tokens, "tp": tp, "methods": methods,
                         "gather_baseline": gather, "load_average_1m": os.getloadavg()[0],
                         "wall_s": time.time() - run_start})
            print(f"[V={vocab} TP={tp} done in {time.time() - run_start:.0f} s]", flush=True)
    pairwise = bench_pairwise(128 if args.quick else 1024, 8 if args.quick else 64, reps, args.device)
    report = {
        "config": {"vocabs": vocabs, "tokens": tokens, "tps": tps, "reps": reps, "quick": args.quick,
                   "dtype": "float32", "threads_per_rank": 1, "device": args.device,
                   "backend": "gloo (CPU)" if args.device == "cpu" else "gloo (CUDA tensors)"},
        "machine": machine_info(args.device),
        "modelopt": modelopt if ok else f"unavailable: {modelopt}; no modelopt comparison was made",
        "runs": runs,
        "pairwise": pairwise,
        "elapsed_s": time.time() - start,
    }
    report["targets"] = _targets(runs, vocabs)
    print_report(report)
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
