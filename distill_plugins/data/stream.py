"""Resumable microbatch streams: the consumed-samples contract shared by every data iterator.

Design
------
Every training iterator of the data package (token ids in
:mod:`.iterators`, raw text in :mod:`.text_batches`, instruction data in
:mod:`.instruct` and :mod:`.instruct_aligned`) draws global samples ``0, 1, 2,
...`` of a source that is a pure function of the recipe seed: microbatch ``k``
of data-parallel rank ``r`` covers samples ``[c + r*b, c + (r+1)*b)`` with
``c`` the consumed count before it, and every rank adds ``b * dp_size``
afterwards. :class:`ConsumedSamplesIterator` holds that bookkeeping and the
checkpoint state; :class:`PrefetchingIterator` adds building the next
microbatch in a background thread for iterators whose batches cost real work.
:func:`rank0_first` runs cache-building code on global rank 0 before the
others. This module imports no other data module, so each iterator module can
build on it without import cycles.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed

from ..errors import InputError

__all__ = ["ConsumedSamplesIterator", "PrefetchingIterator", "rank0_first", "dist_if_initialized"]

T = TypeVar("T")


def dist_if_initialized():
    """``torch.distributed`` when a process group is initialised, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank0_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0, barrier, then on the other ranks (they hit the caches rank 0 built)."""
    dist = dist_if_initialized()
    if dist is None:
        return fn()
    out = None
    if dist.get_rank() == 0:
        try:
            out = fn()
        finally:  # the others must not wait forever when rank 0 fails: they then fail on their own
            dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out


class ConsumedSamplesIterator:
    """Shared bookkeeping of resumable microbatch iterators (the contract in the module docstring).

    Microbatch ``k`` of DP rank ``r`` covers global samples ``[c + r*b, c + (r+1)*b)``
    with ``c`` the consumed count before it; the state is that count. ``stream``
    names what the batches hold (``tokens``, ``text`` or ``instruct``), so a
    checkpoint of one kind of stream never silently resumes another.
    """

    stream = "tokens"

    def __init__(self, *, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 max_microbatches: Optional[int] = None, kind: str = "", split: str = "train", seq_length: int):
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed_samples = self._checked(consumed_samples)
        self.max_microbatches = max_microbatches
        self.kind, self.split = kind, split
        self._yielded = 0
        self._positions = torch.arange(seq_length, dtype=torch.int64).unsqueeze(0).expand(
            micro_batch_size, seq_length).contiguous()

    def _checked(self, consumed: int) -> int:
        step = self.micro_batch_size * self.dp_size
        if consumed < 0 or consumed % step:
            raise ValueError(f"consumed_samples={consumed} must be a non-negative multiple of "
                             f"micro_batch_size*dp_size={step}")
        return int(consumed)

    def __iter__(self):
        return self

    def _next_first(self) -> int:
        """The first global sample of the next microbatch of this rank (StopIteration when bounded and done)."""
        if self.max_microbatches is not None and self._yielded >= self.max_microbatches:
            raise StopIteration
        return self.consumed_samples + self.dp_rank * self.micro_batch_size

    def _advance(self) -> None:
        self.consumed_samples += self.micro_batch_size * self.dp_size
        self._yielded += 1

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this iterator: the global consumed-sample count."""
        return {"consumed_samples": self.consumed_samples, "kind": self.kind, "split": self.split,
                "stream": self.stream}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (same recipe data section)."""
        saved = state.get("stream", "tokens")
        if saved != self.stream:
            what = {"tokens": "token-id batches", "text": "raw-text batches of a cross-tokenizer aligner",
                    "instruct": "prompt/response batches (data.kind: instruct)"}
            raise InputError(f"the checkpoint was trained on {what.get(saved, saved)}, this run reads "
                             f"{what.get(self.stream, self.stream)}; resume with the aligner and tokenizers it "
                             "was written with")
        if state.get("kind", self.kind) != self.kind:
            raise InputError(f"checkpoint data state is for data.kind={state.get('kind')!r}, this run has "
                             f"{self.kind!r}; resume with the data section the checkpoint was written with")
        self.consumed_samples = self._checked(int(state["consumed_samples"]))


class PrefetchingIterator(ConsumedSamplesIterator):
    """A :class:`ConsumedSamplesIterator` whose next microbatch is built in a background thread.

    Subclasses implement :meth:`_build` (the microbatch of global samples
    ``first .. first + micro_batch_size - 1``). While the caller trains on one
    microbatch, one worker thread builds the next (tokenizers release the
    GIL). Batches are a pure function of their sample indices, so prefetching
    changes no value and resumption stays exact: a prefetched batch whose
    first sample no longer matches (after :meth:`load_state_dict`) is discarded.

    Args:
        prefetch: False builds every batch in the calling thread.
        **kw: :class:`ConsumedSamplesIterator` arguments.
    """

    def __init__(self, *, prefetch: bool = True, **kw: Any):
        super().__init__(**kw)
        self.prefetch = prefetch
        self._pending: Optional[tuple[int, Future]] = None  # (first sample index, Future)
        self._executor: Optional[ThreadPoolExecutor] = None

    def _build(self, first: int) -> dict:
        raise NotImplementedError

    def __next__(self) -> dict:
        first = self._next_first()
        batch = None
        if self._pending is not None:
            key, future = self._pending
            self._pending = None
            ready = future.result()  # also when stale: one thread at a time uses the source
            batch = ready if key == first else None
        if batch is None:
            batch = self._build(first)
        self._advance()
        if self.prefetch and (self.max_microbatches is None or self._yielded < self.max_microbatches):
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-batches")
            nxt = self.consumed_samples + self.dp_rank * self.micro_batch_size
            self._pending = (nxt, self._executor.submit(self._build, nxt))
        return batch
