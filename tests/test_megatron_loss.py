"""Loss glue (distill_plugins.engine.loss) on 2 gloo ranks with the vocabulary split over TP.

One 2-process job runs every check and returns plain numbers; a dense
single-process reference is computed in the test process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from distill_plugins.interfaces import PartConfig, Selection, TemperaturePolicy, TokenSelector
from distill_plugins.testing.distributed import run_distributed

V, V_PAD, N = 30, 32, 12


def _data():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, N // 2, V_PAD, generator=g, dtype=torch.float32) * 2
    t = torch.randn(2, N // 2, V_PAD, generator=g, dtype=torch.float32) * 2
    labels = torch.randint(0, V, (2, N // 2), generator=g)
    labels[0, :2] = -100
    return s, t, labels


class HalfSelector(TokenSelector):
    """Keeps even rows; normalises by ``normalize_by``."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        normalize_by: str = "kept"

    def select(self, ctx):
        keep = torch.arange(ctx.student_logits.shape[0]) % 2 == 0
        return Selection(keep=keep, normalize_by=self.config.normalize_by)


class Tau2(TemperaturePolicy):
    scale_loss_by_tau_squared = True

    def temperatures(self, ctx, selection):
        return 2.0


def _dense_fkl(s, t, tau=1.0, vocab=V):
    ls = torch.log_softmax(s[:, :vocab].double() / tau, -1)
    lt = torch.log_softmax(t[:, :vocab].double() / tau, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _case(name, s, t, labels, tp_group, rank, world, vocab=V, **kw):
    from distill_plugins.manager import build_plugin_host
    from distill_plugins.engine.loss import LossParts, distill_loss

    host = build_plugin_host()
    parts = LossParts(objective=host.build("objective", "forward_kl", {}), **kw)
    vl = V_PAD // world
    s_loc = s[..., rank * vl:(rank + 1) * vl].clone().requires_grad_(True)
    t_loc = t[..., rank * vl:(rank + 1) * vl].clone()
    s_before = s_loc.detach().clone()
    loss, count, report = distill_loss(s_loc, t_loc, labels, parts, tp_group=tp_group, vocab_size=vocab)
    loss.backward()
    return {"loss": float(loss), "count": int(count), "report": {k: float(v) for k, v in report.items()},
            "grad": s_loc.grad.clone(), "logits_untouched": torch.equal(s_loc.detach(), s_before)}


def body(rank: int, world: int) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.recipe.schema import ParallelSpec

    ctx = dps.initialize(ParallelSpec(tensor=world), cpu=True)
    tp = ctx.tp_group
    s, t, labels = _data()
    out = {
        "kd": _case("kd", s, t, labels, tp, rank, world),
        "mix": _case("mix", s, t, labels, tp, rank, world, ce_weight=0.5),
        "mix_nopad": _case("mix", s, t, labels, tp, rank, world, vocab=None, ce_weight=0.5),
        "sel_kept": _case("sel", s, t, labels, tp, rank, world, selector=HalfSelector()),
        "sel_all": _case("sel", s, t, labels, tp, rank, world,
                         selector=HalfSelector(HalfSelector.Config(normalize_by="all"))),
        "tau": _case("tau", s, t, labels, tp, rank, world, temperature=Tau2()),
        "empty": _case("empty", s, t, torch.full_like(labels, -100), tp, rank, world, ce_weight=0.5),
    }
    # The hazard the glue guards against: megatron's CE overwrites fp32 logits in place.
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = s[..., rank * (V_PAD // world):(rank + 1) * (V_PAD // world)].clone().transpose(0, 1).contiguous()
    before = x.clone()
    vocab_parallel_cross_entropy(x, labels.clamp(min=0).transpose(0, 1).contiguous())
    out["megatron_ce_in_place"] = not torch.equal(x, before)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(body, 2)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _reference(ce_weight=0.0, keep_even=False, normalize_by="kept", tau=1.0, vocab=V):
    s, t, labels = _data()
    s = _flat(s).double().requires_grad_(True)
    lab = labels.reshape(-1)
    valid = (lab != -100).nonzero().squeeze(1)
    kd_rows = valid[::2] if keep_even else valid
    kd = _dense_fkl(s[kd_rows], _flat(t)[kd_rows], tau, vocab) * tau**2
    ce = torch.nn.functional.cross_entropy(s[valid][:, :vocab], lab[valid], reduction="sum")
    loss = kd.sum() + ce_weight * ce
    loss.backward()
    count = len(kd_rows) if normalize_by == "kept" else len(valid)
    return loss.item(), count, s.grad.reshape(2, N // 2, V_PAD), float(kd.sum()), float(ce)


def _full_grad(results):
    return torch.cat([r["grad"] for r in results], dim=-1)


@pytest.mark.parametrize("case,kw", [
    ("kd", {}),
    ("mix", {"ce_weight": 0.5}),
    ("mix_nopad", {"ce_weight": 0.5, "vocab": V_PAD}),
    ("sel_kept", {"keep_even": True}),
    ("sel_all", {"keep_even": True, "normalize_by": "all"}),
    ("tau", {"tau": 2.0}),
])
def test_matches_dense_reference(results, case, kw):
    loss, count, grad, kd_sum, ce_sum = _reference(**kw)
    for r in results:
        assert r[case]["loss"] == pytest.approx(loss, rel=1e-5)
        assert r[case]["count"] == count
        assert r[case]["report"]["kd_sum"] == pytest.approx(kd_sum, rel=1e-5)
    got = _full_grad([r[case] for r in results]).double()
    torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6)


def test_ce_mix_leaves_kd_intact_and_logits_untouched(results):
    """megatron's CE works in place on fp32 logits; the glue must hand it a copy and run it after KD."""
    for r in results:
        assert r["megatron_ce_in_place"], "megatron changed: vocab_parallel_cross_entropy no longer works in place"
        assert r["mix"]["logits_untouched"] and r["mix_nopad"]["logits_untouched"]
        assert r["mix"]["report"]["kd_sum"] == pytest.approx(r["kd"]["report"]["kd_sum"], rel=1e-6)
        _, _, _, _, ce_sum = _reference(ce_weight=0.5)
        assert r["mix"]["report"]["ce_sum"] == pytest.approx(ce_sum, rel=1e-5)
        assert r["mix"]["report"]["ce_count"] == r["mix"]["report"]["valid_tokens"]


def test_empty_microbatch_is_zero_not_nan(results):
    for r in results:
        e = r["empty"]
        assert e["loss"] == 0.0 and e["count"] == 0
        assert e["report"]["empty_microbatches"] == 1.0
        assert torch.isfinite(e["grad"]).all() and not e["grad"].any()
        assert not math.isnan(e["report"]["kd_sum"])
