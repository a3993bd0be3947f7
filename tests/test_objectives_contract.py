"""distill_plugins.testing.contracts: built-ins pass it, and broken objectives fail it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import Objective, PartConfig
from distill_plugins.objectives import CSD, JSD, TVD, ForwardKL, LogitMSE, ReverseKL, SkewKL, SkewReverseKL
from distill_plugins.objectives.taid import TAID
from distill_plugins.testing.contracts import check_nonfinite_contract, check_objective_contract


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


# ---------------------------------------------------------------------------
# The non-finite-input contract (issue 17 item 13)
# ---------------------------------------------------------------------------

NONFINITE_CASES = [
    (ForwardKL, {}), (ReverseKL, {}), (JSD, {"beta": 0.3}), (TVD, {}), (SkewKL, {}), (SkewReverseKL, {}),
    (LogitMSE, {}), (LogitMSE, {"weight": "T"}), (CSD, {}), (CSD, {"w1": "U", "w2": "U"}),
    (CSD, {"w1": "T", "w2": "S"}), (TAID, {}), (TAID, {"t_start": 1.0}), (TAID, {"t_start": 0.0, "t_end": 0.0}),
]


@pytest.mark.parametrize("cls,params", NONFINITE_CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_every_objective_keeps_the_nonfinite_contract(cls, params):
    check_nonfinite_contract(cls, distributed=False, **params)


def test_nonfinite_inputs_raise_on_every_tp_rank():
    """A NaN / +inf / all--inf row in rank 1's shard only: both ranks raise (no rank waits in a collective)."""
    from distill_plugins.testing.contracts import _NONFINITE_ERRORS, _nonfinite_tp_worker
    from distill_plugins.testing.distributed import run_distributed

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 24, generator=gen), torch.randn(4, 24, generator=gen)
    items = [(cls, cls.Config(**params)) for cls, params in NONFINITE_CASES]
    results = run_distributed(_nonfinite_tp_worker, 2, args=(items, s, t, 21, 1, 19), timeout=300)
    for rank, per_rank in enumerate(results):
        for (cls, params), seen in zip(NONFINITE_CASES, per_rank):
            for name, _, _, message in _NONFINITE_ERRORS:
                assert seen[name] is not None and message in seen[name], (cls.__name__, params, rank, name, seen[name])


def test_csd_infinite_gap_is_plus_inf_and_taid_rejects_nan():
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    t[0, 1] = float("-inf")  # the teacher excludes a token the student does not: an infinite gap
    assert CSD(CSD.Config(w1="U", w2="U"))(s, t).tolist() == [float("inf"), 0.0]
    assert CSD(CSD.Config(w1="T", w2="T"))(s, t).tolist() == [0.0, 0.0]  # zero teacher weight there: 0 * inf = 0
    t[1, 2] = float("nan")
    with pytest.raises(InputError, match=r"teacher_logits contains NaN \(first at token row 1"):
        TAID(TAID.Config())(s.requires_grad_(True), t)
    t[1, 2] = 0.0
    s2 = torch.zeros(2, 4)
    s2[0, 1] = float("-inf")  # at t = 1 (forward KL) the student masks a token the teacher does not
    assert TAID(TAID.Config(t_start=1.0))(s2, torch.zeros(2, 4))[0].item() == float("inf")


class SilentOnNaN(Objective):
    """Broken on purpose: squared logit gap with NaN turned into 0 (the old TAID's behaviour: loss 0)."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        d = torch.nan_to_num(student_logits.float() - teacher_logits.detach().float(), nan=0.0)
        return (d[:, :vocab_size] ** 2).mean(-1)


def test_silent_nan_is_caught():
    with pytest.raises(AssertionError, match="NaN in the student did not raise InputError"):
        check_nonfinite_contract(SilentOnNaN, distributed=False)
