"""Two gloo processes: TP consistency of scores, selections, temperatures and TAID; DP agreement of state.

One process group for the whole module: the module-scoped fixture runs every
rank body once and the tests check the returned results. The world group of 2
serves as the TP group (vocab sharded in two) for the TP checks and as the DP
group (different local losses, all-reduced like the engine does) for the DP checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distill_plugins.interfaces import StepStats, TokenContext
from distill_plugins.objectives.taid import TAID
from distill_plugins.selection import scores as S
from distill_plugins.selection.selectors import (
    LATF,
    AdaSPEC,
    RandomFraction,
    TopFraction,
    broadcast_from_tp_rank0,
)
from distill_plugins.selection.temperature import IDTS
from distill_plugins.testing.distributed import run_distributed

N, V_PAD, V_REAL = 24, 16, 13  # rank 1's shard holds 3 padding columns
LATF_CFG = dict(warmup_fraction=0.0, ema_decay=0.5, ratio_step=0.1, loss_tolerance=0.02, min_ratio=0.3)
TAID_CFG = dict(alpha=0.05, beta=0.5)
STEPS = 6


def _full_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V_PAD, generator=g) * 2
    x[:, V_REAL:] = 25.0  # padding garbage
    return x


def _selections(ctx: TokenContext) -> dict:
    latf = LATF(LATF.Config(**LATF_CFG))
    latf.load_state_dict({"ratio": 0.6, "ema": 1.0, "ref_loss": 1.0, "step": 3})
    sel = latf.select(ctx)
    kept_ctx = TokenContext(student_logits=ctx.student_logits[sel.keep], teacher_logits=ctx.teacher_logits[sel.keep],
                            tp_group=ctx.tp_group, vocab_size=ctx.vocab_size)
    return {
        "scores": {name: S.compute_score(name, ctx) for name in S.SCORE_NAMES},
        "loss_gap": S.loss_gap(ctx.student_logits, ctx.teacher_logits, ctx.reference_logits,
                               tp_group=ctx.tp_group, vocab_size=ctx.vocab_size),
        "keep": {
            "latf": sel.keep,
            "top_fraction": TopFraction(TopFraction.Config(fraction=0.3, score="reverse_kl",
                                                           tp_broadcast=True)).select(ctx).keep,
            "adaspec": AdaSPEC().select(ctx).keep,
            "random_fraction": RandomFraction(RandomFraction.Config(fraction=0.5)).select(ctx).keep,
        },
        "tau_idts": IDTS().temperatures(kept_ctx, sel),
        "tau_idts_own_scores": IDTS(IDTS.Config(score="hellinger")).temperatures(kept_ctx, sel),
    }


def _taid_loss_and_grad(student, teacher, group, tau, vocab_size=V_REAL) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_()
    loss = TAID()(student, teacher, temperature=tau, tp_group=group, vocab_size=vocab_size)
    (loss * torch.arange(1.0, N + 1)).sum().backward()
    return loss.detach(), student.grad


def _dp_states(rank: int, group, reduce: bool) -> dict:
    latf, taid = LATF(LATF.Config(**LATF_CFG)), TAID(TAID.Config(**TAID_CFG))
    history = []
    for step in range(1, STEPS + 1):
        # each rank's local loss sum and token count differ; the engine all-reduces both
        local = torch.tensor([(2.0 / step + 0.37 * rank) * (10 + rank), 10.0 + rank], dtype=torch.float64)
        if reduce:
            dist.all_reduce(local, group=group)
        stats = StepStats(step=step, total_steps=STEPS, kd_loss=float(local[0] / local[1]))
        latf.on_optimizer_step(stats)
        taid.on_optimizer_step(stats)
        history.append((latf.ratio, taid.t))
    return {"latf": latf.state_dict(), "taid": taid.state_dict(), "history": history}


def _chunked_tp(ctx: TokenContext, group, tau) -> dict:
    """Scores and TAID with tiny row chunks (several collectives per call) on the TP shards."""
    saved = S.CHUNK_ELEMENTS
    S.CHUNK_ELEMENTS = 5 * V_PAD  # 10 rows per chunk on rank 0 (8 real columns), 16 on rank 1 (5)
    try:
        return {"hellinger": S.hellinger(ctx.student_logits, ctx.teacher_logits, tp_group=group,
                                         vocab_size=V_REAL),
                "taid": _taid_loss_and_grad(ctx.student_logits, ctx.teacher_logits, group, tau)}
    finally:
        S.CHUNK_ELEMENTS = saved


def _body(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    student, teacher, reference = (_full_logits(s) for s in (1, 2, 3))
    width = V_PAD // world_size
    cols = slice(rank * width, (rank + 1) * width)
    tp_ctx = TokenContext(student_logits=student[:, cols], teacher_logits=teacher[:, cols], tp_group=group,
                          vocab_size=V_REAL, reference_logits=reference[:, cols], step=2, total_steps=10)
    one_ctx = TokenContext(student_logits=student, teacher_logits=teacher, vocab_size=V_REAL,
                           reference_logits=reference, step=2, total_steps=10)
    tau = torch.linspace(0.6, 1.6, N)
    out = {
        "tp": _selections(tp_ctx),
        "tp1": _selections(one_ctx),
        "taid_tp": _taid_loss_and_grad(student[:, cols], teacher[:, cols], group, tau),
        "taid_tp1": _taid_loss_and_grad(student, teacher, None, tau),
        # vocab_size 7 < V_local: rank 1's shard is all padding
        "narrow": {"tp": (S.hellinger(student[:, cols], teacher[:, cols], tp_group=group, vocab_size=7),
                          _taid_loss_and_grad(student[:, cols], teacher[:, cols], group, tau, vocab_size=7)),
                   "tp1": (S.hellinger(student, teacher, vocab_size=7),
                           _taid_loss_and_grad(student, teacher, None, tau, vocab_size=7))},
        "broadcast": broadcast_from_tp_rank0(torch.arange(N) % (2 + rank) == 0, group),
        "chunked": _chunked_tp(tp_ctx, group, tau),
        "dp": _dp_states(rank, group, reduce=True),
        "dp_local_only": _dp_states(rank, group, reduce=False),
    }
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=2)


def test_scores_identical_on_tp_ranks_and_equal_to_tp1(results):
    r0, r1 = results
    for name in S.SCORE_NAMES + ("loss_gap",):
        a = r0["tp"]["scores"][name] if name != "loss_gap" else r0["tp"]["loss_gap"]
        b = r1["tp"]["scores"][name] if name != "loss_gap" else r1["tp"]["loss_gap"]
        ref = r0["tp1"]["scores"][name] if name != "loss_gap" else r0["tp1"]["loss_gap"]
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_selections_identical_on_tp_ranks_and_equal_to_tp1(results):
    r0, r1 = results
    for name, keep in r0["tp"]["keep"].items():
        assert torch.equal(keep, r1["tp"]["keep"][name]), name
        assert torch.equal(keep, r0["tp1"]["keep"][name]), name
        assert 0 < int(keep.sum()) < N, name
    assert int(r0["tp"]["keep"]["latf"].sum()) == int(0.6 * N)


def test_idts_temperatures_identical_on_tp_ranks(results):
    r0, r1 = results
    for key in ("tau_idts", "tau_idts_own_scores"):
        assert torch.equal(r0["tp"][key], r1["tp"][key])
        torch.testing.assert_close(r0["tp"][key], r0["tp1"][key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r0["tp"]["tau_idts"], r0["tp"]["tau_idts_own_scores"])


def test_taid_tp2_equals_tp1(results):
    r0, r1 = results
    (loss0, grad0), (loss1, grad1) = r0["taid_tp"], r1["taid_tp"]
    loss_ref, grad_ref = r0["taid_tp1"]
    assert torch.equal(loss0, loss1)
    torch.testing.assert_close(loss0, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1), grad_ref, atol=1e-5, rtol=1e-5)


def test_row_chunked_tp_matches_unchunked(results):
    for r in results:
        torch.testing.assert_close(r["chunked"]["hellinger"], r["tp"]["scores"]["hellinger"], atol=0, rtol=0)
        torch.testing.assert_close(r["chunked"]["taid"][0], r["taid_tp"][0], atol=0, rtol=0)
        torch.testing.assert_close(r["chunked"]["taid"][1], r["taid_tp"][1], atol=0, rtol=0)


def test_shard_without_real_columns(results):
    r0, r1 = results
    (h0, (loss0, grad0)), (h1, (loss1, grad1)) = r0["narrow"]["tp"], r1["narrow"]["tp"]
    h_ref, (loss_ref, grad_ref) = r0["narrow"]["tp1"]
    assert torch.equal(h0, h1) and torch.equal(loss0, loss1)
    torch.testing.assert_close(h0, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss0, loss_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(grad1 == 0)
    torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1), grad_ref, atol=1e-5, rtol=1e-5)


def test_broadcast_takes_rank0_mask(results):
    r0, r1 = results
    want = torch.arange(N) % 2 == 0
    assert torch.equal(r0["broadcast"], want) and torch.equal(r1["broadcast"], want)


def test_dp_state_identical_after_steps_with_different_local_losses(results):
    r0, r1 = results
    assert r0["dp"] == r1["dp"]  # Python floats: bit for bit
    ratios = [ratio for ratio, _ in r0["dp"]["history"]]
    ts = [t for _, t in r0["dp"]["history"]]
    assert len(set(ratios)) > 2 and len(set(ts)) > 2  # the state really moved
    # without the all-reduce the ranks drift apart: the check above can fail
    assert r0["dp_local_only"] != r1["dp_local_only"]
