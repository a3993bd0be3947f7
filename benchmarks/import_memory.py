"""Peak memory of a TP=2 Hugging Face import per process, against the checkpoint size.

What it does:

1. builds a random Llama-shaped model with ``transformers`` (no download) and
   saves it as sharded safetensors (default ~350 MB fp32: hidden 768, 6 layers,
   ffn 2048, vocab 32000, untied embeddings) in a child process, so the parent
   never holds it;
2. imports it into megatron-core at TP=2 on two gloo processes (CPU layer);
   each process samples its own RSS every 2 ms from a thread while
   :func:`~distill_plugins.models.hf_import.import_hf_model` runs;
3. reports, per rank: RSS before the import (interpreter + torch + megatron),
   peak RSS during it, the increase, and the bytes of tensor slices read; the
   ratio ``peak increase / checkpoint size`` is the figure of merit (target
   < 0.6: a rank holds its half of the weights plus replicated norms and one
   slice in flight).

``--naive`` also measures the alternative this replaces (every rank loads the
whole state dict with ``safetensors.torch.load_file``), for contrast.

Usage::

    .venv/bin/python benchmarks/import_memory.py            # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/import_memory.py --hidden 1024 --layers 8 --naive
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples this process's RSS on a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def make_model(path: str, hidden: int, layers: int, ffn: int, vocab: int, heads: int, kv: int) -> None:
    """Child-process entry: save a random Llama to ``path``."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100MB")


def rank_body(rank, world_size, path, naive):
    import megatron.core.models.gpt  # noqa: F401  (before the CPU layer patches torch.cuda)

    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.models.hf_import import import_hf_model
    from distill_plugins.recipe.schema import ParallelSpec

    enable_cpu_mode()
    parallel = ParallelSpec(tensor=world_size, pipeline=1)
    dps.initialize(parallel, cpu=True)
    import gc

    gc.collect()
    before = _rss()
    with PeakSampler() as sampler:
        model, report = import_hf_model(path, parallel, cpu=True)
    after = _rss()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"rank": rank, "before": before, "peak": sampler.peak, "after": after, "bytes_read": report.bytes_read,
           "param_bytes": param_bytes, "checkpoint_bytes": report.checkpoint_bytes}
    if naive:
        del model
        gc.collect()
        from safetensors.torch import load_file

        before = _rss()
        with PeakSampler() as sampler:
            state = {}
            for name in sorted(os.listdir(path)):
                if name.endswith(".safetensors"):
                    # clone: load_file may hand out lazily mapped storage; a loader then shards from memory
                    state.update({k: v.clone() for k, v in load_file(os.path.join(path, name)).items()})
        out["naive_increase"] = sampler.peak - before
        del state
    dps.destroy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--naive", action="store_true", help="also measure loading the whole state dict per rank")
    ap.add_argument("--keep", metavar="DIR", help="save the model here and keep it (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    from distill_plugins.testing.distributed import run_distributed

    with tempfile.TemporaryDirectory(prefix="distill-import-mem-") as tmp:
        path = args.keep or os.path.join(tmp, "llama")
        if not os.path.isfile(os.path.join(path, "config.json")):
            code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                    f"import import_memory as m; m.make_model({path!r}, {args.hidden}, {args.layers}, {args.ffn}, "
                    f"{args.vocab}, {args.heads}, {args.kv_heads})")
            subprocess.run([sys.executable, "-c", code], check=True)
        t0 = time.monotonic()
        results = run_distributed(rank_body, world_size=args.tp, args=(path, args.naive))
        elapsed = time.monotonic() - t0
    ckpt = results[0]["checkpoint_bytes"]
    mb = lambda b: b / 2**20  # noqa: E731
    rows = []
    for r in results:
        inc = r["peak"] - r["before"]
        rows.append({**r, "increase": inc, "ratio": inc / ckpt, "read_ratio": r["bytes_read"] / ckpt})
    if args.json:
        print(json.dumps({"checkpoint_bytes": ckpt, "tp": args.tp, "ranks": rows, "seconds": elapsed}, indent=2))
    else:
        print(f"checkpoint: {mb(ckpt):.1f} MB, TP={args.tp}, import wall time {elapsed:.1f}s (incl. start-up)")
        for r in rows:
            line = (f"rank {r['rank']}: RSS before {mb(r['before']):.0f} MB, peak {mb(r['peak']):.0f} MB, "
                    f"increase {mb(r['increase']):.1f} MB = {r['ratio']:.3f} x checkpoint; "
                    f"slices read {mb(r['bytes_read']):.1f} MB = {r['read_ratio']:.3f} x; "
                    f"parameters held {mb(r['param_bytes']):.1f} MB")
            if "naive_increase" in r:
                line += f"; naive full load {mb(r['naive_increase']):.1f} MB = {r['naive_increase'] / ckpt:.3f} x"
            print(line)
    worst = max(r["ratio"] for r in rows)
    print(f"worst peak increase / checkpoint size = {worst:.3f} (target < 0.6): {'OK' if worst < 0.6 else 'FAIL'}")
    return 0 if worst < 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
