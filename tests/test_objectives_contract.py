"""distill_plugins.testing.contracts: built-ins pass it, and broken objectives fail it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distill_plugins.interfaces import Objective, PartConfig
from distill_plugins.objectives import CSD, JSD, TVD, ForwardKL, LogitMSE, ReverseKL, SkewKL, SkewReverseKL
from distill_plugins.testing.contracts import check_objective_contract


@pytest.mark.parametrize("cls,params", [
    (ForwardKL, {}), (ReverseKL, {}), (JSD, {"beta": 0.3}), (TVD, {}), (SkewKL, {}), (SkewReverseKL, {}),
    (LogitMSE, {"weight": "T"}), (CSD, {"w1": "U", "w2": "T", "weight_temperature": 2.0}),
])
def test_builtins_pass_serial_checks(cls, params):
    check_objective_contract(cls, distributed=False, **params)


def test_csd_passes_with_tp2():
    check_objective_contract(CSD(CSD.Config(w1="T", w2="S")))


class LeaksAcrossRows(Objective):
    """Broken on purpose: every row's loss includes the batch mean."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        per_row = ((student_logits.float() - teacher_logits.detach().float()) ** 2).mean(-1)
        return per_row + per_row.mean()


class CountsPadding(Objective):
    """Broken on purpose: ignores vocab_size, so padded columns matter."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        return ((student_logits.float() - teacher_logits.detach().float()).clamp(-5, 5) ** 2).mean(-1)


class ShardLocalSoftmax(Objective):
    """Broken on purpose: a softmax over the local shard only (wrong at TP > 1)."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        width = student_logits.shape[1]
        if vocab_size is not None and tp_group is None:
            width = min(width, vocab_size)
        elif vocab_size is not None:
            rank = torch.distributed.get_rank(tp_group)
            width = max(0, min(width, vocab_size - rank * width))
        s = torch.log_softmax(student_logits[:, :width].float(), -1)
        t = torch.log_softmax(teacher_logits[:, :width].detach().float(), -1)
        out = (t.exp() * (t - s)).sum(-1)
        if tp_group is not None:
            from distill_plugins.parallel import all_reduce_sum

            out = all_reduce_sum(out, tp_group)
        return out


def test_row_leak_is_caught():
    with pytest.raises(AssertionError, match="depend on that row only"):
        check_objective_contract(LeaksAcrossRows, distributed=False)


def test_padding_leak_is_caught():
    with pytest.raises(AssertionError, match="padded columns"):
        check_objective_contract(CountsPadding, distributed=False)


def test_tp_mismatch_is_caught():
    check_objective_contract(ShardLocalSoftmax, distributed=False)  # fine serially ...
    with pytest.raises(AssertionError, match="TP=2 loss on rank 0 differs from TP=1"):
        check_objective_contract(ShardLocalSoftmax)  # ... wrong with the vocabulary split
