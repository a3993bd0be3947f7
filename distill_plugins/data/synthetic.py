"""Synthetic token batches: deterministic, layout-independent, for tests and smoke runs.

Design
------
Sample ``i`` of the run (a global index over all steps, microbatches and
data-parallel ranks) is drawn from its own CPU generator seeded by
``(seed, i)``, so the same global batch is produced whatever the data-parallel
size or microbatch split: step ``t`` holds samples ``[t * G, (t + 1) * G)``
(``G`` = global batch size), and data-parallel rank ``r`` of ``D`` takes
microbatch ``m`` = samples ``t * G + (m * D + r) * b + [0, b)``.

Each sample is ``seq_length + 1`` tokens from a noisy order-1 recurrence (so
there is something to learn); ``tokens = x[:-1]``, ``labels = x[1:]`` (labels are
pre-shifted: ``labels[j]`` is the token after ``tokens[j]``), and a random
prompt prefix of up to a quarter of the sequence has ``labels = -100``.

Microbatch format (the engine's contract, shared with ``distill_plugins.data``)::

    {"tokens": int64 [b, s], "labels": int64 [b, s] (-100 = no loss)}

The layout, resumption and microbatch assembly are
:class:`distill_plugins.data.iterators.MicrobatchIterator`'s (its
consumed-sample order is the one above); this module adds only the sample
source, :class:`RecurrenceSource`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from distill_plugins.data.iterators import MicrobatchIterator
from distill_plugins.interfaces import IGNORE_INDEX

__all__ = ["synthetic_sample", "RecurrenceSource", "SyntheticBatches"]


def _sequence(index: int, *, vocab_size: int, seq_length: int, seed: int) -> tuple[torch.Tensor, int]:
    """``(x [s + 1], prompt)``: the token sequence of global sample ``index`` and its prompt length."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7919 + 17) % (2**63))
    x = torch.empty(seq_length + 1, dtype=torch.int64)
    x[0] = torch.randint(0, vocab_size, (1,), generator=g)
    steps = torch.randint(1, 4, (seq_length,), generator=g)
    noise = torch.rand(seq_length, generator=g) < 0.2
    jumps = torch.randint(0, vocab_size, (seq_length,), generator=g)
    for j in range(seq_length):
        x[j + 1] = jumps[j] if noise[j] else (x[j] * 3 + steps[j]) % vocab_size
    prompt = int(torch.randint(0, max(1, seq_length // 4), (1,), generator=g))
    return x, prompt


def synthetic_sample(index: int, *, vocab_size: int, seq_length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [s], labels [s])`` of global sample ``index``."""
    x, prompt = _sequence(index, vocab_size=vocab_size, seq_length=seq_length, seed=seed)
    tokens, labels = x[:-1].clone(), x[1:].clone()
    labels[:prompt] = IGNORE_INDEX
    return tokens, labels


class RecurrenceSource:
    """The noisy recurrence as a :mod:`distill_plugins.data.sources` source.

    ``sample(i) -> (text [s + 1] int64, loss_mask [s] float32)``; the prompt
    prefix has ``loss_mask`` 0. Unbounded (``num_samples`` is None).
    """

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size, self.seq_length, self.seed = int(vocab_size), int(seq_length), int(seed)
        self.num_samples = None
        self.description = f"recurrence(vocab={vocab_size}, seq={seq_length}, seed={seed})"

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        x, prompt = _sequence(index, vocab_size=self.vocab_size, seq_length=self.seq_length, seed=self.seed)
        mask = np.ones(self.seq_length, dtype=np.float32)
        mask[:prompt] = 0.0
        return x.numpy(), mask


class SyntheticBatches:
    """Iterator of this data-parallel rank's microbatches, step after step.

    Args:
        vocab_size: real vocabulary size.
        seq_length: tokens per sequence.
        micro_batch_size: sequences per microbatch.
        global_batch_size: sequences per optimizer step over all DP ranks.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        seed: data seed.
        start_step: first step to produce (resume).

    ``state_dict()`` / ``load_state_dict()`` carry the position (step, microbatch).
    """

    def __init__(self, *, vocab_size: int, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, start_step: int = 0):
        self.per_microbatch = micro_batch_size * dp_size  # samples all DP ranks consume per microbatch
        if global_batch_size % self.per_microbatch:
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                             f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
        self.global_batch = global_batch_size
        self.num_microbatches = global_batch_size // self.per_microbatch
        self.source = RecurrenceSource(vocab_size, seq_length, seed)
        self._it = MicrobatchIterator(self.source, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                      dp_size=dp_size, consumed_samples=start_step * global_batch_size,
                                      kind="synthetic")

    @property
    def step(self) -> int:
        """The step the next microbatch belongs to."""
        return self._it.consumed_samples // self.global_batch

    @property
    def micro_index(self) -> int:
        """The next microbatch's index within its step."""
        return self._it.consumed_samples % self.global_batch // self.per_microbatch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        # out of place: with one row, tokens and labels can be views of the same buffer
        labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX)
        return {"tokens": batch["tokens"], "labels": labels}

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_index": self.micro_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        step, micro = int(state["step"]), int(state["micro_index"])
        self._it.consumed_samples = step * self.global_batch + micro * self.per_microbatch
