"""What the loss benchmarks share: peak-memory measurement, devices, megatron's TP state, the report file.

Used by ``benchmarks/objectives.py`` and ``benchmarks/fused_output_layer.py`` (imported
as ``_harness``: a script's own folder is first on ``sys.path``, in the spawned worker
processes too).

Peak extra memory of one call (:class:`PeakMemory`): on CPU the rise of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``,
glibc's free lists trimmed first) over the resident set before the call; on CUDA
the caching allocator's ``max_memory_allocated`` over ``memory_allocated`` before
the call.

Usage::

    device = worker_device(cfg["device"], rank)
    memory = PeakMemory(device)
    memory.start(); run(); memory.sync(); extra = memory.peak_extra()
    ...
    report = {..., "machine": machine_info(args.device)}
    write_report(report, args.out)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `make install`
    sys.path.insert(0, str(ROOT))

__all__ = ["ROOT", "PeakMemory", "benchmark_parser", "check_device", "fmt_bytes", "machine_info",
           "set_megatron_tp_group", "worker_device", "write_report"]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: peaks are then upper bounds
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # no procfs write access: the peak is then the process's lifetime peak
        pass


class PeakMemory:
    """Peak extra memory of one call (module docstring): process RSS on CPU, the caching allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            self.base = _status_kb("VmRSS") * 1024
            _reset_peak()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_extra(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def worker_device(device: str, rank: int) -> torch.device:
    """``cpu``, or ``cuda:<rank>`` made the current device."""
    if device == "cpu":
        return torch.device("cpu")
    dev = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(dev)
    return dev


def set_megatron_tp_group(group: Any, rank: int, tp: int) -> None:
    """Minimal megatron parallel_state (TP group, size, rank) for ``vocab_parallel_cross_entropy`` on gloo."""
    from megatron.core import parallel_state as ps  # heavy: only the worker processes need it

    ps._TENSOR_MODEL_PARALLEL_GROUP = group if group is not None else dist.group.WORLD
    ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = tp
    ps._MPU_TENSOR_MODEL_PARALLEL_RANK = rank


def benchmark_parser(doc: str, *, name: str, tokens_help: str, reps_help: str) -> argparse.ArgumentParser:
    """The options every loss benchmark takes: --quick, --vocab, --tokens, --tp, --reps, --device, --out.

    ``doc``: the script's docstring (its first paragraph is the description); ``name``: the
    report's file name under ``benchmarks/results/`` (``<name>.json``).
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32768 131072; quick 4096)")
    p.add_argument("--tokens", type=int, help=tokens_help)
    p.add_argument("--tp", type=int, nargs="+", help="TP sizes (default 1 2)")
    p.add_argument("--reps", type=int, help=reps_help)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu, or cuda (rank r on cuda:r; collectives still through gloo)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{name}.json"))
    return p


def check_device(parser: argparse.ArgumentParser, device: str, tps: Sequence[int] = (1,)) -> None:
    """``--device cuda`` needs a CUDA build and one GPU per TP rank; a parser error otherwise."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False (a CPU-only torch build, or no GPU)")
    if max(tps) > torch.cuda.device_count():
        parser.error(f"--tp {max(tps)} needs {max(tps)} GPUs, {torch.cuda.device_count()} visible")


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU count, torch version, 1-minute load average and the GPU's name (if any)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_report(report: dict[str, Any], path: Optional[str | os.PathLike]) -> Path:
    """Write ``report`` as indented JSON to ``path`` (parents created); prints where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return out
