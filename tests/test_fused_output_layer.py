"""The fused output layer (distill_plugins.objectives.fused) against the materialised path.

Materialised reference: logits ``h W^T`` (the hidden states through megatron's
copy-to-TP region) fed to :func:`distill_plugins.engine.loss.distill_loss`, the
engine's loss glue. Fused: :func:`distill_plugins.engine.fused_loss.fused_distill_loss` on the hidden states and
weight shards. Compared: the loss, the report, and the gradients with respect to
the student's hidden states and output-layer weight, within 1e-5 relative in fp32,
for every built-in objective, with padded vocabularies, ignored rows and a chunk
size that does not divide the row count. TP=2 runs once per module in one gloo
process group (:func:`tp2_body`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distill_plugins
from distill_plugins.engine.fused_loss import fused_distill_loss
from distill_plugins.engine.loss import LossParts, distill_loss
from distill_plugins.errors import DistillError, InputError
from distill_plugins.interfaces import Objective, PartConfig, Selection, TemperaturePolicy, TokenSelector
from distill_plugins.objectives.fused import (
    TOKEN_STATS,
    default_chunk_rows,
    fused_output_layer_loss,
    fused_support,
    objective_supports_fused,
    replicated_input,
    token_statistics,
)
from distill_plugins.selection import scores
from distill_plugins.selection.selectors import LATF, AdaSPEC, AllTokens, RandomFraction, TopFraction, top_fraction_keep
from distill_plugins.selection.temperature import IDTS, ConstantTemperature, ScheduledTemperature, idts_temperatures
from distill_plugins.testing.distributed import run_distributed

OBJECTIVES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("skew_kl", {}),
              ("skew_reverse_kl", {}), ("logit_mse", {"weight": "S"}), ("csd", {"w1": "U", "w2": "S"}),
              ("taid", {"t_start": 0.3})]
TOL = 1e-5


# --------------------------------------------------------------------------- parts used by the tests


class TokenTemperature(TemperaturePolicy):
    """Per-token temperatures from the labels (no statistics), with tau**2 scaling: exercises [N_kept] taus."""

    scale_loss_by_tau_squared = True

    def fused_token_stats(self):
        return ()

    def temperatures(self, ctx, selection):
        return 0.7 + (ctx.labels % 7).float() / 10.0


class EveryOtherToken(TokenSelector):
    """Keeps even label ids: a selection that needs no statistics (normalised by all tokens)."""

    def fused_token_stats(self):
        return ()

    def select(self, ctx):
        return Selection(keep=ctx.labels % 2 == 0, normalize_by="all")


class HardestHalf(TokenSelector):
    """A plugin-style AdaKD selector: top half by Hellinger distance, from ctx.token_stats when fused."""

    def fused_token_stats(self):
        return ("hellinger",)

    def select(self, ctx):
        if ctx.token_stats is not None:
            s = ctx.token_stats["hellinger"]
        else:
            s = scores.hellinger(ctx.student_logits, ctx.teacher_logits, tp_group=ctx.tp_group,
                                 vocab_size=ctx.vocab_size)
        return Selection(keep=top_fraction_keep(s, 0.5), scores=s)


class InverseDifficulty(TemperaturePolicy):
    """A plugin-style IDTS: temperatures from the Hellinger distances of the kept rows."""

    scale_loss_by_tau_squared = True

    def fused_token_stats(self):
        return ("hellinger",)

    def temperatures(self, ctx, selection):
        if ctx.token_stats is not None:
            s = ctx.token_stats["hellinger"]
        else:
            s = scores.hellinger(ctx.student_logits, ctx.teacher_logits, tp_group=ctx.tp_group,
                                 vocab_size=ctx.vocab_size)
        return idts_temperatures(s, 1.0, 0.5)


class ReadsLogits(TokenSelector):
    """Declares no statistics but reads the logits anyway: must fail loudly when fused."""

    def fused_token_stats(self):
        return ()

    def select(self, ctx):
        return Selection(keep=ctx.student_logits.float().sum(-1) > 0)


class Undeclared(TokenSelector):
    """Keeps the base class's fused_token_stats() -> None."""

    def select(self, ctx):
        return Selection(keep=torch.ones(ctx.student_logits.shape[0], dtype=torch.bool))


class PlainObjective(Objective):
    """Does not claim fused support."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)


# --------------------------------------------------------------------------- helpers


def _problem(seed=0, n_b=3, n_s=13, h=16, ht=24, vocab=50, padded=64, dtype=torch.float32, tp=1, rank=0):
    """Hidden states [s, b, H] (megatron layout), labels [b, s] with ignored rows, weight shards of this rank."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n_s, n_b, h, generator=g)
    ht_ = torch.randn(n_s, n_b, ht, generator=g)
    hr = torch.randn(n_s, n_b, h, generator=g)
    ws = torch.randn(padded, h, generator=g) * 0.6
    wt = torch.randn(padded, ht, generator=g) * 0.6
    wr = torch.randn(padded, h, generator=g) * 0.6
    labels = torch.randint(0, vocab, (n_b, n_s), generator=g)
    labels[0, 2] = labels[1, 5] = labels[2, 0] = -100
    v_local = padded // tp
    cols = slice(rank * v_local, (rank + 1) * v_local)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(hs=cast(hs), ht=cast(ht_), hr=cast(hr), ws=cast(ws[cols].contiguous()), wt=cast(wt[cols].contiguous()),
                wr=cast(wr[cols].contiguous()), labels=labels, vocab=vocab)


def _materialised(p, parts, *, group=None, loss_mask=None, reference=False):
    hs = p["hs"].detach().clone().requires_grad_(True)
    ws = p["ws"].detach().clone().requires_grad_(True)
    zs = torch.matmul(replicated_input(hs, group), ws.t()).transpose(0, 1)  # [b, s, V_local]
    zt = torch.matmul(p["ht"], p["wt"].t()).transpose(0, 1)
    zr = torch.matmul(p["hr"], p["wr"].t()).transpose(0, 1) if reference else None
    loss, count, report = distill_loss(zs, zt, p["labels"], parts, loss_mask=loss_mask, reference_logits=zr,
                                       tp_group=group, vocab_size=p["vocab"])
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    return loss.detach(), count, report, gh, gw


def _fused(p, parts, *, group=None, loss_mask=None, reference=False, chunk_rows=7, sequence_parallel=False,
           hidden=None):
    hs = (p["hs"] if hidden is None else hidden).detach().clone().requires_grad_(True)
    ws = p["ws"].detach().clone().requires_grad_(True)
    ht = p["ht"]
    if sequence_parallel:
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        rows = ht.shape[0] // world
        ht = ht[rank * rows:(rank + 1) * rows]
    loss, count, report = fused_distill_loss(
        hs, ws, ht, p["wt"], p["labels"], parts, loss_mask=loss_mask,
        reference_hidden=p["hr"] if reference else None, reference_weight=p["wr"] if reference else None,
        tp_group=group, vocab_size=p["vocab"], chunk_rows=chunk_rows, sequence_parallel=sequence_parallel)
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    return loss.detach(), count, report, gh, gw


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _compare(fused, mat) -> dict:
    (lf, cf, rf, ghf, gwf), (lm, cm, rm, ghm, gwm) = fused, mat
    out = {"loss": _rel(lf, lm), "grad_hidden": _rel(ghf, ghm), "grad_weight": _rel(gwf, gwm),
           "count": int(cf) == int(cm)}
    for k in rm:
        out[f"report:{k}"] = _rel(rf[k], rm[k]) if float(rm[k]) else abs(float(rf[k]))
    return out


def _assert_close(res: dict, what: str, tol: float = TOL) -> None:
    assert res["count"], f"{what}: token counts differ"
    bad = {k: v for k, v in res.items() if k != "count" and v > tol}
    assert not bad, f"{what}: relative differences above {tol}: {bad}"


def _parts(name, params, **kw):
    return LossParts(objective=distill_plugins.build_objective(name, **params), **kw)


# --------------------------------------------------------------------------- TP=1, in process


@pytest.mark.parametrize("name,params", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_fused_equals_materialised_tp1(name, params):
    p = _problem()
    mask = torch.ones_like(p["labels"])
    mask[2, 7] = 0
    parts = _parts(name, params, temperature=TokenTemperature(), kd_weight=1.0, ce_weight=0.5)
    res = _compare(_fused(p, parts, loss_mask=mask), _materialised(p, parts, loss_mask=mask))
    _assert_close(res, name)


def test_selection_without_statistics_and_kd_only():
    p = _problem(seed=3)
    parts = _parts("csd", {}, selector=EveryOtherToken(), kd_weight=2.0, ce_weight=0.0)
    _assert_close(_compare(_fused(p, parts, chunk_rows=5), _materialised(p, parts)), "kd only, every other")


def test_ce_only_without_teacher():
    p = _problem(seed=4)
    parts = _parts("forward_kl", {}, kd_weight=0.0, ce_weight=1.0)
    hs = p["hs"].detach().clone().requires_grad_(True)
    ws = p["ws"].detach().clone().requires_grad_(True)
    loss, count, report = fused_distill_loss(hs, ws, None, None, p["labels"], parts, vocab_size=p["vocab"],
                                             chunk_rows=4)
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    zs = torch.matmul(hs, ws.t()).transpose(0, 1)
    lm, cm, rm = distill_loss(zs, None, p["labels"], parts, vocab_size=p["vocab"])
    ghm, gwm = torch.autograd.grad(lm, [hs, ws])
    _assert_close(_compare((loss, count, report, gh, gw), (lm.detach(), cm, rm, ghm, gwm)), "ce only")
    assert float(report["kd_count"]) == 0 and int(count) == int((p["labels"] != -100).sum())


def test_default_chunk_and_flat_rows():
    """[N, H] rows with [N] labels, default chunk size (one chunk here) and the eval path (no grad)."""
    p = _problem(seed=5)
    parts = _parts("reverse_kl", {}, ce_weight=0.3)
    flat = dict(p, hs=p["hs"].transpose(0, 1).reshape(-1, 16), ht=p["ht"].transpose(0, 1).reshape(-1, 24),
                labels=p["labels"].reshape(-1))
    mat = list(_materialised(p, parts))
    mat[3] = mat[3].transpose(0, 1).reshape(-1, 16)  # [s, b, H] -> [N, H] rows in the labels' order
    _assert_close(_compare(_fused(flat, parts, chunk_rows=None), mat), "flat rows")
    with torch.no_grad():
        loss, _, _ = fused_distill_loss(flat["hs"], flat["ws"], flat["ht"], flat["wt"], flat["labels"], parts,
                                        vocab_size=p["vocab"])
    assert not loss.requires_grad and _rel(loss, mat[0]) < TOL
    assert default_chunk_rows(152064) == 256 and default_chunk_rows(8192) == 4096


def test_bf16_sanity():
    p = _problem(seed=6, dtype=torch.bfloat16)
    parts = _parts("forward_kl", {}, ce_weight=0.5)
    lf, cf, rf, ghf, gwf = _fused(p, parts, chunk_rows=8)
    lm, cm, rm, ghm, gwm = _materialised(p, parts)
    assert ghf.dtype == torch.bfloat16 and gwf.dtype == torch.bfloat16
    assert all(bool(torch.isfinite(x).all()) for x in (lf, ghf, gwf))
    assert _rel(lf, lm) < 1e-2 and _rel(rf["ce_sum"], rm["ce_sum"]) < 1e-2
    assert _rel(ghf, ghm) < 5e-2 and _rel(gwf, gwm) < 5e-2


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_holds_all_rows_of_logits():
    n_b, n_s, h, padded, rows = 4, 24, 8, 64, 16   # N = 96 rows, N x V_local = 6144
    p = _problem(seed=7, n_b=n_b, n_s=n_s, h=h, ht=h, vocab=60, padded=padded)
    parts = _parts("csd", {}, ce_weight=1.0)
    hs = p["hs"].detach().clone().requires_grad_(True)
    ws = p["ws"].detach().clone().requires_grad_(True)
    with _LargestTensor() as probe:
        loss, _, _ = fused_distill_loss(hs, ws, p["ht"], p["wt"], p["labels"], parts, vocab_size=60, chunk_rows=rows)
        loss.backward()
    n = n_b * n_s
    assert probe.largest <= max(rows * padded, n * h, padded * h), probe.largest
    assert probe.largest < n * padded // 4


# --------------------------------------------------------------------------- statistics pass, AdaKD, AdaSPEC


def _rows_of(p):
    valid = (p["labels"] != -100).reshape(-1)
    flat = lambda x: x.transpose(0, 1).reshape(-1, x.shape[-1])[valid]  # noqa: E731
    return flat(p["hs"]), flat(p["ht"]), flat(p["hr"]), p["labels"].reshape(-1)[valid]


def test_statistics_pass_equals_scores_on_logits():
    p = _problem(seed=8)
    hs, ht, hr, _ = _rows_of(p)
    stats = token_statistics(hs, p["ws"], ht, p["wt"], TOKEN_STATS, reference_hidden=hr, reference_weight=p["wr"],
                             vocab_size=p["vocab"], chunk_rows=6)
    zs, zt, zr = hs @ p["ws"].t(), ht @ p["wt"].t(), hr @ p["wr"].t()
    kw = dict(vocab_size=p["vocab"])
    expect = {"hellinger": scores.hellinger(zs, zt, **kw), "forward_kl": scores.forward_kl(zs, zt, **kw),
              "reverse_kl": scores.reverse_kl(zs, zt, **kw), "student_entropy": scores.student_entropy(zs, **kw),
              "loss_gap": scores.loss_gap(zs, zt, zr, **kw)}
    assert not stats.nonfinite
    for name, value in expect.items():
        assert _rel(stats.values[name], value) < 1e-6, name
    with pytest.raises(InputError, match="reference"):
        token_statistics(hs, p["ws"], ht, p["wt"], ["loss_gap"], vocab_size=p["vocab"])
    with pytest.raises(InputError, match="unknown token statistics"):
        token_statistics(hs, p["ws"], ht, p["wt"], ["perplexity"], vocab_size=p["vocab"])


def test_adakd_latf_idts_through_the_statistics_pass():
    """LATF's Hellinger scores and IDTS's temperatures from the statistics pass equal the built-ins' on logits,
    and the fused loss with that selection equals distill_loss with LATF + IDTS."""
    p = _problem(seed=9)
    latf, idts = LATF(LATF.Config()), IDTS(IDTS.Config(c=0.8))
    latf.ratio = 0.6
    parts = _parts("forward_kl", {}, selector=latf, temperature=idts, ce_weight=0.25)
    mat = _materialised(p, parts)
    hs, ht, _, lab = _rows_of(p)
    stats = token_statistics(hs, p["ws"], ht, p["wt"], ["hellinger"], vocab_size=p["vocab"], chunk_rows=5)
    zs, zt = hs @ p["ws"].t(), ht @ p["wt"].t()
    ctx = distill_plugins.TokenContext(zs, zt, vocab_size=p["vocab"], labels=lab)
    selection = latf.select(ctx)
    assert _rel(stats.values["hellinger"], selection.scores) < 1e-6
    keep = top_fraction_keep(stats.values["hellinger"], latf.ratio)
    assert torch.equal(keep, selection.keep)
    kept_ctx = distill_plugins.TokenContext(zs[keep], zt[keep], vocab_size=p["vocab"], labels=lab[keep])
    tau = idts.temperatures(kept_ctx, selection)
    assert _rel(idts_temperatures(stats.values["hellinger"][keep], 1.0, 0.8), tau) < 1e-6
    hs_l = hs.detach().clone().requires_grad_(True)
    ws_l = p["ws"].detach().clone().requires_grad_(True)
    out = fused_output_layer_loss(hs_l, ws_l, ht, p["wt"], lab, parts.objective, keep=keep, temperature=tau,
                                  scale_loss_by_tau_squared=True, ce_weight=0.25, vocab_size=p["vocab"], chunk_rows=4)
    gw = torch.autograd.grad(out.loss, ws_l)[0]
    assert _rel(out.loss, mat[0]) < TOL and _rel(gw, mat[4]) < TOL
    assert _rel(out.kd_sum, mat[2]["kd_sum"]) < TOL and _rel(out.ce_sum, mat[2]["ce_sum"]) < TOL


def test_adaspec_loss_gap_through_the_statistics_pass():
    p = _problem(seed=10)
    adaspec = AdaSPEC(AdaSPEC.Config(fraction=0.4))
    parts = _parts("forward_kl", {}, selector=adaspec, ce_weight=0.0)
    mat = _materialised(p, parts, reference=True)
    hs, ht, hr, lab = _rows_of(p)
    stats = token_statistics(hs, p["ws"], ht, p["wt"], ["loss_gap"], reference_hidden=hr, reference_weight=p["wr"],
                             vocab_size=p["vocab"], chunk_rows=9)
    zs, zt, zr = hs @ p["ws"].t(), ht @ p["wt"].t(), hr @ p["wr"].t()
    assert _rel(stats.values["loss_gap"], scores.loss_gap(zs, zt, zr, vocab_size=p["vocab"])) < 1e-6
    selection = adaspec.select(distill_plugins.TokenContext(zs, zt, vocab_size=p["vocab"], labels=lab,
                                                            reference_logits=zr))
    hs_l = hs.detach().clone().requires_grad_(True)
    out = fused_output_layer_loss(hs_l, p["ws"], ht, p["wt"], lab, parts.objective, keep=selection.keep,
                                  vocab_size=p["vocab"], chunk_rows=4)
    gh = torch.autograd.grad(out.loss, hs_l)[0]
    valid = (p["labels"] != -100).reshape(-1)
    assert _rel(out.loss, mat[0]) < TOL and _rel(out.kd_sum, mat[2]["kd_sum"]) < TOL
    assert _rel(gh, mat[3].transpose(0, 1).reshape(-1, 16)[valid]) < TOL


def test_plugin_selector_and_policy_read_token_stats_end_to_end():
    p = _problem(seed=11)
    parts = _parts("jsd", {}, selector=HardestHalf(), temperature=InverseDifficulty(), ce_weight=0.5)
    assert fused_support(parts).token_stats == ("hellinger",)
    _assert_close(_compare(_fused(p, parts, chunk_rows=6), _materialised(p, parts)), "plugin AdaKD-like parts")


# --------------------------------------------------------------------------- support, errors, non-finite


def test_fused_support_reports_each_part():
    ok = fused_support(_parts("csd", {}, selector=HardestHalf()))
    assert ok.supported and ok.token_stats == ("hellinger",)
    assert all(objective_supports_fused(distill_plugins.build_objective(n, **kw)) for n, kw in OBJECTIVES)
    plain = PlainObjective()
    assert not objective_supports_fused(plain)
    bad = fused_support(LossParts(objective=plain, selector=Undeclared()))
    assert not bad.supported and len(bad.reasons) == 2
    assert "supports_fused_output_layer" in bad.reasons[0] and "reads the logits" in bad.reasons[1]
    assert fused_support(LossParts(objective=plain, kd_weight=0.0, ce_weight=1.0)).supported
    p = _problem()
    with pytest.raises(DistillError, match="cannot run on the fused output layer"):
        _fused(p, LossParts(objective=plain))


def test_a_part_reading_placeholder_logits_fails_loudly():
    p = _problem()
    with pytest.raises(DistillError, match="token_stats"):
        _fused(p, _parts("forward_kl", {}, selector=ReadsLogits()))


def test_bad_inputs_raise():
    p = _problem()
    parts = _parts("forward_kl", {})
    labels = p["labels"].clone()
    labels[0, 0] = 50  # == vocab_size: outside the real vocabulary
    with pytest.raises(InputError, match="outside the vocabulary"):
        _fused(dict(p, labels=labels), parts)
    with pytest.raises(InputError, match="do not match labels"):
        _fused(dict(p, labels=p["labels"].t().contiguous()), parts)
    with pytest.raises(InputError, match="dtype"):
        _fused(dict(p, ws=p["ws"].double()), parts)
    with pytest.raises(DistillError, match="no teacher"):
        fused_distill_loss(p["hs"], p["ws"], None, None, p["labels"], parts, vocab_size=50)


def test_nonfinite_logits_skip_the_microbatch():
    p = _problem(seed=12)
    parts = _parts("forward_kl", {}, ce_weight=1.0)
    wt = p["wt"].clone()
    wt[5, 0] = float("nan")
    hs = p["hs"].detach().clone().requires_grad_(True)
    ws = p["ws"].detach().clone().requires_grad_(True)
    loss, count, report = fused_distill_loss(hs, ws, p["ht"], wt, p["labels"], parts, vocab_size=50, chunk_rows=8)
    loss.backward()
    assert float(report["nonfinite"]) == 1 and int(count) == 0 and loss.item() == 0.0
    assert not bool(hs.grad.any()) and not bool(ws.grad.any())
    # the same through the statistics pass
    loss, count, report = fused_distill_loss(hs, ws, p["ht"], wt, p["labels"],
                                             _parts("forward_kl", {}, selector=HardestHalf()), vocab_size=50)
    assert float(report["nonfinite"]) == 1 and int(count) == 0


def test_empty_microbatch():
    p = _problem()
    labels = torch.full_like(p["labels"], -100)
    hs = p["hs"].detach().clone().requires_grad_(True)
    loss, count, report = fused_distill_loss(hs, p["ws"], p["ht"], p["wt"], labels, _parts("csd", {}),
                                             vocab_size=50)
    loss.backward()
    assert int(count) == 0 and float(report["empty_microbatches"]) == 1 and not bool(hs.grad.any())


# --------------------------------------------------------------------------- TP=2, one process group


def _set_megatron_tp_group(group, rank: int, tp: int) -> None:
    """megatron parallel_state for vocab_parallel_cross_entropy (the materialised CE) on gloo."""
    from megatron.core import parallel_state as ps

    ps._TENSOR_MODEL_PARALLEL_GROUP = group
    ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = tp
    ps._MPU_TENSOR_MODEL_PARALLEL_RANK = rank


def tp2_body(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    group = torch.distributed.group.WORLD
    _set_megatron_tp_group(group, rank, world)
    out = {}
    # 1. every objective, padded vocabulary (real 500 of 512: rank 1 holds 244 real columns)
    p = _problem(seed=20, vocab=500, padded=512, tp=world, rank=rank)
    for name, params in OBJECTIVES:
        parts = _parts(name, params, temperature=TokenTemperature(), ce_weight=0.5)
        out[name] = _compare(_fused(p, parts, group=group, chunk_rows=8), _materialised(p, parts, group=group))
    # 2. rank 1 holds only padding (real 250 of 512)
    p = _problem(seed=21, vocab=250, padded=512, tp=world, rank=rank)
    for name in ("forward_kl", "csd"):
        parts = _parts(name, {}, ce_weight=1.0)
        out[f"{name}/padding-only shard"] = _compare(_fused(p, parts, group=group, chunk_rows=10),
                                                     _materialised(p, parts, group=group))
    # 3. plugin AdaKD-like parts through the statistics pass
    p = _problem(seed=22, vocab=500, padded=512, tp=world, rank=rank)
    parts = _parts("forward_kl", {}, selector=HardestHalf(), temperature=InverseDifficulty(), ce_weight=0.5)
    out["stats pass selection"] = _compare(_fused(p, parts, group=group, chunk_rows=6),
                                           _materialised(p, parts, group=group))
    # 4. the statistics themselves, AdaSPEC's loss gap included
    hs, ht, hr, _ = _rows_of(p)
    stats = token_statistics(hs, p["ws"], ht, p["wt"], TOKEN_STATS, reference_hidden=hr, reference_weight=p["wr"],
                             tp_group=group, vocab_size=p["vocab"], chunk_rows=7)
    zs, zt, zr = hs @ p["ws"].t(), ht @ p["wt"].t(), hr @ p["wr"].t()
    kw = dict(tp_group=group, vocab_size=p["vocab"])
    out["stats"] = {"hellinger": _rel(stats.values["hellinger"], scores.hellinger(zs, zt, **kw)),
                    "forward_kl": _rel(stats.values["forward_kl"], scores.forward_kl(zs, zt, **kw)),
                    "student_entropy": _rel(stats.values["student_entropy"], scores.student_entropy(zs, **kw)),
                    "loss_gap": _rel(stats.values["loss_gap"], scores.loss_gap(zs, zt, zr, **kw)),
                    "count": True}
    # 5. sequence parallelism: this rank's [s/2, b, H] slice; gradients are the non-SP ones of that slice
    parts = _parts("csd", {"w1": "T", "w2": "S"}, ce_weight=0.5)
    p = _problem(seed=23, n_s=14, vocab=500, padded=512, tp=world, rank=rank)
    ref = _fused(p, parts, group=group)
    sl = slice(rank * 7, (rank + 1) * 7)
    sp = _fused(p, parts, group=group, sequence_parallel=True, hidden=p["hs"][sl])
    out["sequence parallel"] = {"loss": _rel(sp[0], ref[0]), "grad_hidden": _rel(sp[3], ref[3][sl]),
                                "grad_weight": _rel(sp[4], ref[4]), "count": int(sp[1]) == int(ref[1])}
    # 6. a NaN only in rank 1's shard: both ranks skip the microbatch
    wt = p["wt"].clone()
    if rank == 1:
        wt[3, 1] = float("nan")
    _, count, report = fused_distill_loss(p["hs"], p["ws"], p["ht"], wt, p["labels"], parts, tp_group=group,
                                          vocab_size=p["vocab"], chunk_rows=8)
    out["nonfinite agreed"] = float(report["nonfinite"]) == 1 and int(count) == 0
    return out


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(tp2_body, 2)


def test_tp2_fused_equals_materialised(tp2_results):
    for rank, res in enumerate(tp2_results):
        for name, _ in OBJECTIVES:
            _assert_close(res[name], f"TP=2 rank {rank} {name}")
        for key in ("forward_kl/padding-only shard", "csd/padding-only shard", "stats pass selection"):
            _assert_close(res[key], f"TP=2 rank {rank} {key}")


def test_tp2_statistics_sequence_parallel_and_nonfinite(tp2_results):
    for rank, res in enumerate(tp2_results):
        _assert_close(res["stats"], f"TP=2 rank {rank} statistics", tol=1e-6)
        _assert_close(res["sequence parallel"], f"TP=2 rank {rank} sequence parallel")
        assert res["nonfinite agreed"], f"rank {rank} did not flag the NaN held by rank 1"


# --------------------------------------------------------------------------- the contract checker


class ChunkSensitive(Objective):
    """Broken on purpose: claims fused support, but each row's loss includes the call's mean."""

    supports_fused_output_layer = True

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        per_row = (student_logits.float() - teacher_logits.detach().float()).pow(2).mean(-1)
        return per_row + per_row.mean()


def test_fused_contract_accepts_builtins_and_catches_chunk_sensitive_objectives():
    from distill_plugins.testing.contracts import check_fused_contract

    for name, params in OBJECTIVES:
        check_fused_contract(distill_plugins.build_objective(name, **params), distributed=False)
    with pytest.raises(AssertionError, match="rows must be independent"):
        check_fused_contract(ChunkSensitive, distributed=False)
    with pytest.raises(AssertionError, match="does not set supports_fused_output_layer"):
        check_fused_contract(PlainObjective, distributed=False)


# --------------------------------------------------------------------------- built-in selectors and policies


@pytest.mark.parametrize("selector,policy,reference", [
    (lambda: AllTokens(AllTokens.Config()), lambda: ConstantTemperature(ConstantTemperature.Config(value=2.0)), False),
    (lambda: RandomFraction(RandomFraction.Config(fraction=0.5)),
     lambda: ScheduledTemperature(ScheduledTemperature.Config(start=1.0, end=3.0)), False),
    (lambda: TopFraction(TopFraction.Config(fraction=0.5, score="reverse_kl")), lambda: IDTS(IDTS.Config()), False),
    (lambda: LATF(LATF.Config(initial_ratio=0.6, max_ratio=0.6)), lambda: IDTS(IDTS.Config(c=0.8)), False),
    (lambda: AdaSPEC(AdaSPEC.Config(fraction=0.4)), lambda: IDTS(IDTS.Config(score="student_entropy")), True),
], ids=["all+constant", "random+schedule", "top_fraction+idts", "latf+idts", "adaspec+idts"])
def test_builtin_selectors_and_policies_run_fused(selector, policy, reference):
    p = _problem(seed=30)
    parts = _parts("forward_kl", {}, selector=selector(), temperature=policy(), ce_weight=0.5)
    mat_parts = _parts("forward_kl", {}, selector=selector(), temperature=policy(), ce_weight=0.5)
    assert fused_support(parts).supported
    res = _compare(_fused(p, parts, chunk_rows=6, reference=reference),
                   _materialised(p, mat_parts, reference=reference))
    _assert_close(res, "built-in parts")
