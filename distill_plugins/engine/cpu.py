"""CPU layer: run megatron-core's CUDA-only code paths on the CPU, explicitly.

Design
------
megatron-core allocates with ``device="cuda"`` / ``torch.cuda.current_device()``,
seeds and forks the CUDA RNG, and checks tensor type names such as
``'torch.cuda.FloatTensor'``. None of that works on a CPU-only machine, yet a CPU
run on gloo is what tests and recipe dry runs need. :func:`enable_cpu_mode`
makes those paths run on the CPU by installing, for the whole process:

1. A torch function mode (:class:`CudaToCpuMode`) that rewrites device arguments:

   * ``device=`` keyword arguments that name CUDA (``"cuda"``, ``"cuda:1"``,
     ``torch.device("cuda", 0)``, or a bare ``int`` device index) become ``"cpu"``;
   * ``pin_memory=True`` becomes ``False``; ``Tensor.pin_memory()`` is the identity;
   * ``Tensor.to(<cuda device or int>, ...)`` and ``Tensor.to(device=...)`` go to the CPU;
   * ``Tensor.cuda(...)`` is the identity;
   * ``Tensor.type()`` (no argument) reports ``'torch.cuda.<X>Tensor'`` for a CPU
     tensor, so megatron's optimizer and gradient clipping accept CPU parameters
     (``clip_grad_by_total_norm_fp32`` asserts ``'torch.cuda.FloatTensor'``; the
     (distributed) optimizer dispatches on the same names).

2. Stand-ins on ``torch.cuda`` (and ``torch.cuda.random``): ``current_device`` -> 0,
   ``device_count`` -> 1, ``synchronize`` / ``empty_cache`` -> no-op,
   ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` / ``manual_seed_all``
   -> the CPU default generator, ``memory_allocated`` / ``max_memory_allocated`` /
   ``memory_reserved`` -> 0, and ``torch.cuda.nvtx.range_push`` / ``range_pop`` /
   ``mark`` -> no-op (the CPU build of torch has no NVTX).
   ``torch.cuda.is_available`` is deliberately *not* patched: it stays ``False``,
   so code that branches on it (apex/TE probes, CUDA streams, fused kernels) keeps
   taking its CPU-safe branch.

3. megatron's ``tensor_parallel.random._get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` read and write the CPU default generator, so the
   ``CudaRNGStatesTracker`` (``model_parallel_cuda_manual_seed``, ``fork()``,
   activation-checkpoint RNG restore) works unchanged: the "CUDA" generator *is*
   the CPU generator while the mode is on.

Nothing is patched unless :func:`enable_cpu_mode` (or :func:`cpu_mode`) is called;
the engine calls it only for ``device: cpu`` recipes or ``distill run --cpu``. On
GPUs nothing is patched. :func:`disable_cpu_mode` restores every original.

Limits: CUDA streams/events/graphs, transformer-engine, fused kernels (apex,
flash attention), fp8 and CPU offloading are not emulated; bf16 works but is
slow on CPU. ``dist_checkpointing`` save/load works under gloo, but the entry
script must guard its main with ``if __name__ == "__main__"`` (megatron's async
writer starts a process that re-imports the main module) and ``psutil`` must be
installed.

Usage::

    from distill_plugins.engine.cpu import enable_cpu_mode, cpu_mode

    enable_cpu_mode()          # process-wide, idempotent
    ...
    with cpu_mode():           # or scoped
        model = build_model(...)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import torch.cuda.nvtx as nvtx
import torch.cuda.random as cuda_random
from torch.overrides import TorchFunctionMode

__all__ = ["CudaToCpuMode", "enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_cpu_mode", "PATCHED"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"depth": 0, "mode": None, "saved": []}


def _is_cuda_device(device: Any) -> bool:
    """True for ``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)`` and bare int indices."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode sending every CUDA placement to the CPU (see module docstring)."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------
# Stand-ins
# ---------------------------------------------------------------------------


def _make(kind: str, name: str) -> Callable:
    """A fresh function object per patched attribute.

    torch._dynamo maps torch objects to tracing rules by identity and rejects one
    object appearing under two names, so no stand-in may be shared.
    """
    if kind == "noop":
        def fn(*args: Any, **kwargs: Any) -> None:
            return None
    elif kind == "zero":
        def fn(*args: Any, **kwargs: Any) -> int:
            return 0
    elif kind == "one":
        def fn(*args: Any, **kwargs: Any) -> int:
            return 1
    elif kind == "get_rng":
        def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.default_generator.get_state()
    elif kind == "set_rng":
        def fn(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            torch.default_generator.set_state(new_state)
    elif kind == "seed":
        def fn(seed: int) -> None:
            # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. us.
            torch.default_generator.manual_seed(int(seed))
    else:  # pragma: no cover
        raise ValueError(kind)
    fn.__name__ = fn.__qualname__ = f"cpu_mode_{name}"
    return fn


def _patch_table() -> list[tuple[Any, str, Any]]:
    """(object, attribute, replacement) for everything :func:`enable_cpu_mode` patches."""
    specs = [
        (torch.cuda, "current_device", "zero"),
        (torch.cuda, "device_count", "one"),
        (torch.cuda, "synchronize", "noop"),
        (torch.cuda, "empty_cache", "noop"),
        (torch.cuda, "set_device", "noop"),
        (torch.cuda, "memory_allocated", "zero"),
        (torch.cuda, "max_memory_allocated", "zero"),
        (torch.cuda, "memory_reserved", "zero"),
        (nvtx, "range_push", "noop"),
        (nvtx, "range_pop", "noop"),
        (nvtx, "mark", "noop"),
    ]
    table: list[tuple[Any, str, Any]] = [(obj, attr, _make(kind, attr)) for obj, attr, kind in specs]
    # torch.cuda.X and torch.cuda.random.X are one object; keep it that way.
    for attr, kind in (("get_rng_state", "get_rng"), ("set_rng_state", "set_rng"),
                       ("manual_seed", "seed"), ("manual_seed_all", "seed")):
        fn = _make(kind, attr)
        table += [(torch.cuda, attr, fn), (cuda_random, attr, fn)]
    try:
        # megatron-core takes seconds to import: loaded when the layer is switched on, not when this module is
        # imported (`distill export`'s parser imports it on the megatron-free `distill --help` / check / plan path)
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core absent: the torch-level layer still works
        mrandom = None
    if mrandom is not None:
        table += [
            (mrandom, "_get_cuda_rng_state", _make("get_rng", "megatron_get_cuda_rng_state")),
            (mrandom, "_set_cuda_rng_state", _make("set_rng", "megatron_set_cuda_rng_state")),
        ]
    return table


#: Human-readable list of what :func:`enable_cpu_mode` patches (for docs and logs).
PATCHED: tuple[str, ...] = (
    "torch function mode: device=cuda|int -> cpu, pin_memory -> False, Tensor.cuda/pin_memory -> identity, "
    "Tensor.to(cuda) -> cpu, Tensor.type() -> 'torch.cuda.*Tensor'",
    "torch.cuda.{current_device,device_count,synchronize,empty_cache,set_device,memory_allocated,"
    "max_memory_allocated,memory_reserved}",
    "torch.cuda[.random].{get_rng_state,set_rng_state,manual_seed,manual_seed_all} -> CPU default generator",
    "torch.cuda.nvtx.{range_push,range_pop,mark} -> no-op",
    "megatron.core.tensor_parallel.random.{_get_cuda_rng_state,_set_cuda_rng_state} -> CPU default generator",
)


def is_cpu_mode() -> bool:
    """Whether :func:`enable_cpu_mode` is in effect in this process."""
    return _STATE["depth"] > 0


def enable_cpu_mode() -> None:
    """Install the CPU layer process-wide (idempotent; nested calls are counted).

    Must be called on the main thread before megatron builds models or optimizers.
    Refuses when CUDA is actually available, because mixing real CUDA with the
    redirection would silently run a GPU job on the CPU.

    Raises:
        RuntimeError: when ``torch.cuda.is_available()`` is true.
    """
    with _LOCK:
        if _STATE["depth"] == 0:
            if torch.cuda.is_available():
                raise RuntimeError("enable_cpu_mode() refused: CUDA is available; the CPU layer is for CPU-only "
                                   "dry runs (drop `device: cpu` / --cpu to use the GPUs)")
            saved = []
            for obj, attr, repl in _patch_table():
                saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, repl)
            mode = CudaToCpuMode()
            mode.__enter__()
            _STATE.update(mode=mode, saved=saved)
        _STATE["depth"] += 1


def disable_cpu_mode() -> None:
    """Undo one :func:`enable_cpu_mode`; the last one restores every original."""
    with _LOCK:
        if _STATE["depth"] == 0:
            return
        _STATE["depth"] -= 1
        if _STATE["depth"] == 0:
            mode: Optional[CudaToCpuMode] = _STATE["mode"]
            if mode is not None:
                mode.__exit__(None, None, None)
            for obj, attr, original in reversed(_STATE["saved"]):
                setattr(obj, attr, original)
            _STATE.update(mode=None, saved=[])


@contextlib.contextmanager
def cpu_mode(enabled: bool = True) -> Iterator[None]:
    """Context manager around :func:`enable_cpu_mode`; ``enabled=False`` does nothing."""
    if not enabled:
        yield
        return
    enable_cpu_mode()
    try:
        yield
    finally:
        disable_cpu_mode()
