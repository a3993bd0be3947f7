"""pytest plugin shipped with distill-plugins, auto-loaded through the ``pytest11`` entry point.

Fixtures for plugin authors:

* ``distill_plugin_host``: ``make(*modules)`` builds a fresh plugin host with the
  built-ins plus the named plugin modules, entry points switched off so the
  test sees only what it asks for.
* ``sharded_logits``: ``make(n_tokens, vocab_size, padded, world_size=1, seed=0)``
  returns dense ``[N, padded]`` student and teacher logits (fp32, padded columns
  filled with large values so a part that forgets the padding is caught) and a
  function slicing a rank's ``[N, padded/world_size]`` shard.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def distill_plugin_host(monkeypatch):
    from distill_plugins.manager import NO_ENTRY_POINTS_ENV, build_plugin_host

    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")

    def make(*modules: str):
        return build_plugin_host(list(modules))

    return make


def make_sharded_logits(n_tokens: int, vocab_size: int, padded: int, world_size: int = 1, seed: int = 0):
    """Dense student/teacher logits with poisoned padding, and a shard slicer."""
    if padded % world_size:
        raise ValueError(f"padded={padded} is not divisible by world_size={world_size}")
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n_tokens, padded, generator=gen) * 2
    teacher = torch.randn(n_tokens, padded, generator=gen) * 2
    student[:, vocab_size:] = 50.0  # would dominate any softmax that forgets the padding
    teacher[:, vocab_size:] = -50.0

    def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
        width = padded // world_size
        return tensor[:, rank * width:(rank + 1) * width].clone()

    return student, teacher, shard


@pytest.fixture
def sharded_logits():
    return make_sharded_logits
