"""pytest plugin shipped with distill-plugins, auto-loaded through the ``pytest11`` entry point.

Fixtures for plugin authors (each returns a factory, so one test can make several):

* ``distill_plugin_host``: ``make(*modules: str) -> PluginHost``, a fresh plugin
  host with the built-ins plus the named plugin modules, entry points switched
  off so the test sees only what it asks for.
* ``sharded_logits``: ``make(n_tokens, vocab_size, padded, world_size=1, seed=0)
  -> (student, teacher, shard)``: dense ``[N, padded]`` student and teacher logits
  (fp32, padded columns filled with large values so a part that forgets the
  padding is caught) and ``shard(tensor, rank)`` slicing a rank's
  ``[N, padded / world_size]`` block.
* ``token_context``: ``make(n_tokens=8, vocab_size=21, padded=24, *, step=0,
  total_steps=10, seed=0) -> TokenContext``, what a selector's ``select`` and a
  temperature policy's ``temperatures`` receive on one rank: unsharded logits
  (the student's requiring grad), reference logits and labels.

The contract checkers (:mod:`distill_plugins.testing.contracts`) need no fixture.
docs/writing_plugins.md lists these signatures.
"""

from __future__ import annotations

import pytest
import torch

from distill_plugins.interfaces import TokenContext
from distill_plugins.manager import NO_ENTRY_POINTS_ENV, build_plugin_host


@pytest.fixture
def distill_plugin_host(monkeypatch):
    """Factory ``make(*modules: str) -> PluginHost``: built-ins plus ``modules``, no entry points.

    ``DISTILL_PLUGINS_NO_ENTRY_POINTS`` is set for the test, so installed plugins
    cannot change what the test sees. Each call builds a new host.
    """
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")

    def make(*modules: str):
        return build_plugin_host(list(modules))

    return make


def make_sharded_logits(n_tokens: int, vocab_size: int, padded: int, world_size: int = 1, seed: int = 0):
    """Dense student/teacher logits ``[n_tokens, padded]`` with poisoned padding, and a shard slicer.

    Returns:
        ``(student, teacher, shard)``: fp32 logits whose columns ``>= vocab_size`` are
        +50 (student) and -50 (teacher), and ``shard(tensor, rank)``, the contiguous
        ``[n_tokens, padded / world_size]`` block of ``rank``.

    Raises:
        ValueError: ``padded`` is not divisible by ``world_size``.
    """
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
    """Factory ``make(n_tokens, vocab_size, padded, world_size=1, seed=0) -> (student, teacher, shard)``.

    See :func:`make_sharded_logits`: poisoned padding columns catch parts that
    include them; ``shard(tensor, rank)`` gives a TP rank's block.
    """
    return make_sharded_logits


def make_token_context(n_tokens: int = 8, vocab_size: int = 21, padded: int = 24, *, step: int = 0,
                       total_steps: int = 10, seed: int = 0) -> TokenContext:
    """A one-rank :class:`~distill_plugins.TokenContext` of ``n_tokens`` valid rows.

    Student logits ``[N, padded]`` require grad (a part must detach what it keeps);
    teacher and reference logits are ``[N, padded]``; padded columns are poisoned as
    in :func:`make_sharded_logits`; labels are ``[N]`` ids below ``vocab_size``.
    """
    student, teacher, _ = make_sharded_logits(n_tokens, vocab_size, padded, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    reference = teacher + torch.randn(n_tokens, padded, generator=gen)
    reference[:, vocab_size:] = 50.0
    labels = torch.randint(0, vocab_size, (n_tokens,), generator=gen)
    return TokenContext(student_logits=student.requires_grad_(True), teacher_logits=teacher, tp_group=None,
                        vocab_size=vocab_size, labels=labels, reference_logits=reference, step=step,
                        total_steps=total_steps)


@pytest.fixture
def token_context():
    """Factory ``make(n_tokens=8, vocab_size=21, padded=24, *, step=0, total_steps=10, seed=0) -> TokenContext``.

    What ``select(ctx)`` and ``temperatures(ctx, selection)`` receive, on one rank
    (``tp_group=None``); see :func:`make_token_context`.
    """
    return make_token_context
