"""Run a function on several local gloo processes and collect what each returns.

Used by this project's tests and offered to plugin authors: start the process
group once and run several checks inside it, because process start-up (and
importing megatron.core) dominates the cost of a multi-rank test.

Usage::

    def body(rank, world_size, x):
        group = torch.distributed.group.WORLD
        ...
        return {"loss": loss.item()}

    results = run_distributed(body, world_size=2, args=(3.0,))
    assert results[0]["loss"] == results[1]["loss"]

``body`` must be importable (a module-level function) because processes are
spawned. An exception on any rank is re-raised in the caller with that rank's
traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill_plugins.engine.process_groups import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure, including SystemExit, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 600) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Returns:
        The per-rank return values, indexed by rank (they must be picklable by
        ``torch.save``).

    Raises:
        RuntimeError: with the failing rank's traceback when any rank raised.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="distill-dist-") as outdir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), outdir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, failures = [], []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pt")
            if not os.path.exists(path):
                failures.append(f"rank {r}: exited with code {procs[r].exitcode} and reported nothing")
                results.append(None)
                continue
            out = torch.load(path, weights_only=False)
            if out["ok"]:
                results.append(out["result"])
            else:
                failures.append(f"rank {r}:\n{out['error']}")
                results.append(None)
        if failures:
            raise RuntimeError("distributed run failed\n" + "\n".join(failures))
        return results
