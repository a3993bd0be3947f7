"""Temperature policies: constant, schedule, IDTS (hand-computed temperatures, range, median)."""

from __future__ import annotations

import math

import pluggy
import pytest
import torch

from distill_plugins import hookspecs
from distill_plugins.config import parse_dataclass
from distill_plugins.errors import InputError
from distill_plugins.interfaces import Selection, TemperaturePolicy, TokenContext
from distill_plugins.registry import Registry
from distill_plugins.selection import scores as S
from distill_plugins.selection.temperature import IDTS, ConstantTemperature, ScheduledTemperature, idts_temperatures


def ctx_for(n: int = 4, step: int = 0, total: int = 10, seed: int = 0) -> TokenContext:
    g = torch.Generator().manual_seed(seed)
    return TokenContext(student_logits=torch.randn(n, 8, generator=g), teacher_logits=torch.randn(n, 8, generator=g),
                        step=step, total_steps=total)


def sel_all(n: int, scores=None) -> Selection:
    return Selection(keep=torch.ones(n, dtype=torch.bool), scores=scores)


def test_idts_temperatures_hand_computed():
    # median (of 5) = 0.2; tanh(log x) = (x^2 - 1) / (x^2 + 1)
    scores = torch.tensor([0.1, 0.2, 0.4, 0.8, 0.05])
    base, c = 2.0, 0.5
    shat = [-0.6, 0.0, 0.6, 15 / 17, -15 / 17]
    want = [base * math.exp(-c * v) for v in shat]
    got = IDTS(IDTS.Config(base=base, c=c)).temperatures(ctx_for(5), sel_all(5, scores))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and not got.requires_grad
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert got[1].item() == base  # the median token sits exactly at base
    assert got[3] < got[2] < got[1] < got[0] < got[4]  # harder -> colder


def test_idts_range_and_even_count_median():
    scores = torch.tensor([1e-30, 1e-3, 0.2, 0.3, 0.9, 1.0])  # lower median = 0.2
    base, c = 1.0, 0.5
    tau = idts_temperatures(scores, base, c)
    assert torch.all(tau >= base * math.exp(-c) - 1e-6) and torch.all(tau <= base * math.exp(c) + 1e-6)
    assert tau[2].item() == base
    assert tau[0].item() == pytest.approx(math.exp(c), rel=1e-6)  # far below the median: hottest
    tau = idts_temperatures(torch.rand(1000, generator=torch.Generator().manual_seed(1)), 1.5, 0.7)
    assert tau.min() >= 1.5 * math.exp(-0.7) - 1e-6 and tau.max() <= 1.5 * math.exp(0.7) + 1e-6
    assert idts_temperatures(torch.zeros(0), 1.0, 0.5).shape == (0,)
    assert torch.all(idts_temperatures(torch.tensor([0.3, 0.1, 0.9]), 1.3, 0.0) == 1.3)  # c = 0: constant


def test_idts_zero_median_is_finite():
    tau = idts_temperatures(torch.tensor([0.0, 0.0, 0.0, 0.5]), 1.0, 0.5)
    assert torch.isfinite(tau).all()
    assert tau[:3].tolist() == [1.0, 1.0, 1.0]
    assert tau[3].item() == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_idts_scores_source():
    ctx = ctx_for(5, seed=3)
    hell = S.hellinger(ctx.student_logits, ctx.teacher_logits)
    policy = IDTS()
    assert policy.scale_loss_by_tau_squared is True
    # no selection scores: computes Hellinger on the kept rows itself
    torch.testing.assert_close(policy.temperatures(ctx, sel_all(5)), idts_temperatures(hell, 1.0, 0.5))
    # selection scores over all N rows are restricted to the kept rows
    keep = torch.tensor([True, False, True, True, False, True, True])
    full = torch.tensor([0.5, 9.0, 0.1, 0.2, 9.0, 0.4, 0.3])
    got = policy.temperatures(ctx, Selection(keep=keep, scores=full))
    torch.testing.assert_close(got, idts_temperatures(full[keep], 1.0, 0.5))
    # a named score is always computed
    fkl = S.forward_kl(ctx.student_logits, ctx.teacher_logits)
    named = IDTS(IDTS.Config(score="forward_kl"))
    torch.testing.assert_close(named.temperatures(ctx, Selection(keep=keep, scores=full)),
                               idts_temperatures(fkl, 1.0, 0.5))
    with pytest.raises(InputError, match="kept scores"):
        policy.temperatures(ctx, Selection(keep=torch.ones(3, dtype=torch.bool), scores=torch.ones(3)))
    assert IDTS(IDTS.Config(scale_loss_by_tau_squared=False)).scale_loss_by_tau_squared is False


def test_constant_and_schedule():
    const = ConstantTemperature(ConstantTemperature.Config(value=2.0))
    assert const.temperatures(ctx_for(), sel_all(4)) == 2.0 and const.scale_loss_by_tau_squared is False
    assert ConstantTemperature(ConstantTemperature.Config(scale_loss_by_tau_squared=True)).scale_loss_by_tau_squared

    lin = ScheduledTemperature(ScheduledTemperature.Config(start=2.0, end=1.0))
    assert [lin.temperatures(ctx_for(step=s, total=10), sel_all(4)) for s in (0, 5, 10, 15)] == \
        pytest.approx([2.0, 1.5, 1.0, 1.0])
    cos = ScheduledTemperature(ScheduledTemperature.Config(start=2.0, end=1.0, shape="cosine", steps=8))
    got = [cos.temperatures(ctx_for(step=s, total=100), sel_all(4)) for s in (0, 2, 4, 8, 50)]
    assert got == pytest.approx([2.0, 1 + 0.5 * (1 + math.cos(math.pi / 4)), 1.5, 1.0, 1.0])


@pytest.mark.parametrize("cls, params, key", [
    (IDTS, {"c": -0.5}, "c=-0.5"),
    (IDTS, {"base": 0.0}, "base=0.0"),
    (IDTS, {"score": "hellinguer"}, "did you mean 'hellinger'"),
    (ConstantTemperature, {"value": -1.0}, "value=-1.0"),
    (ScheduledTemperature, {"start": 0}, "start=0"),
    (ScheduledTemperature, {"steps": 0}, "steps=0"),
    (ScheduledTemperature, {"shape": "cosin"}, "did you mean 'cosine'"),
])
def test_bad_config_is_reported_with_key(cls, params, key):
    obj, errors = parse_dataclass(cls.Config, params, "temperature")
    assert obj is None and len(errors) == 1 and key in errors[0], errors


def test_builtin_plugin_registers_policies():
    from distill_plugins.builtin import temperature as builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin)
    reg = Registry("temperature_policy")
    pm.hook.distill_register_temperature_policies(register=lambda n, c: reg.add(n, c, plugin="builtin.temperature"))
    assert reg.names() == ["constant", "idts", "schedule"]
    idts = reg.build("idts", {"base": 1.0, "c": 0.5})
    assert isinstance(idts, TemperaturePolicy) and idts.config.c == 0.5
