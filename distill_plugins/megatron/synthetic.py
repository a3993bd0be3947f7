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
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["synthetic_sample", "SyntheticBatches"]


def synthetic_sample(index: int, *, vocab_size: int, seq_length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [s], labels [s])`` of global sample ``index``."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7919 + 17) % (2**63))
    x = torch.empty(seq_length + 1, dtype=torch.int64)
    x[0] = torch.randint(0, vocab_size, (1,), generator=g)
    steps = torch.randint(1, 4, (seq_length,), generator=g)
    noise = torch.rand(seq_length, generator=g) < 0.2
    jumps = torch.randint(0, vocab_size, (seq_length,), generator=g)
    for j in range(seq_length):
        x[j + 1] = jumps[j] if noise[j] else (x[j] * 3 + steps[j]) % vocab_size
    tokens, labels = x[:-1].clone(), x[1:].clone()
    prompt = int(torch.randint(0, max(1, seq_length // 4), (1,), generator=g))
    labels[:prompt] = -100
    return tokens, labels


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
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                             f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch_size // per_step
        self.step, self.micro_index = start_step, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        base = self.step * self.global_batch + (self.micro_index * self.dp_size + self.dp_rank) * self.micro
        pairs = [synthetic_sample(base + j, vocab_size=self.vocab_size, seq_length=self.seq_length, seed=self.seed)
                 for j in range(self.micro)]
        self.micro_index += 1
        if self.micro_index == self.num_microbatches:
            self.micro_index, self.step = 0, self.step + 1
        return {"tokens": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_index": self.micro_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_index = int(state["step"]), int(state["micro_index"])
