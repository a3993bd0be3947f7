"""Aligners under tensor parallelism: two gloo ranks against a one-process reference.

One process group for the module. Each rank builds the same full head weights,
hidden states and batch, slices its vocabulary shard (as megatron's
ColumnParallelLinear output layer holds it), and computes every loss twice:
with the TP group over the shards, and with ``tp_group=None`` over the full
tensors. The test compares losses, projector initialisations and gradients
(projectors, student hidden states, the student's logits shard).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_plugins import build_plugin_host
from distill_plugins.aligners import AlignerInputs, DSKDAligner, ETAAligner, IdentityAligner, ULDAligner, VocabMap
from distill_plugins.aligners._tp import copy_to_tp, vocab_parallel_argmax
from distill_plugins.parallel import group_rank, group_size
from distill_plugins.testing.distributed import run_distributed

D_S, D_T = 8, 12


def _shard(full: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous row block of a ``[V_pad, d]`` head weight."""
    if group is None:
        return full
    width = full.shape[0] // group_size(group)
    r = group_rank(group)
    return full[r * width:(r + 1) * width]


def _problem(seed: int, vs_pad: int, vt_pad: int, n_s: int, n_t: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "ws": torch.randn(vs_pad, D_S, generator=g) * 0.5,
        "wt": torch.randn(vt_pad, D_T, generator=g) * 0.5,
        "hs": torch.randn(n_s, D_S, generator=g),
        "ht": torch.randn(n_t, D_T, generator=g),
    }


def _dskd_run(prob, group, cfg, vocab_map, pairs, labels, vs, vt, objective):
    """Init + one loss/backward; returns everything to compare."""
    aligner = DSKDAligner(DSKDAligner.Config(**cfg))
    aligner.setup(objective=objective, vocab_map=vocab_map)
    ws, wt = _shard(prob["ws"], group), _shard(prob["wt"], group)
    aligner.build_projectors(D_S, D_T, seed=7)
    aligner.init_projectors(ws, wt, tp_group=group, student_vocab_size=vs, teacher_vocab_size=vt)
    init = {k: v.detach().clone() for k, v in aligner.projectors.state_dict().items()}
    hs = prob["hs"].clone().requires_grad_(True)
    ws_param = ws.clone().requires_grad_(True)  # the student's own head: trained by the student logits only
    zs = F.linear(copy_to_tp(hs, group), ws_param)
    zs.retain_grad()
    zt = prob["ht"] @ wt.T
    out = aligner.loss(AlignerInputs(student_logits=zs, teacher_logits=zt, pairs=pairs, student_labels=labels,
                                     student_hidden=hs, teacher_hidden=prob["ht"], student_head_weight=ws_param,
                                     teacher_head_weight=wt, tp_group=group, student_vocab_size=vs,
                                     teacher_vocab_size=vt, temperature=1.5))
    out.loss_sum.backward()
    return {
        "loss": out.loss_sum.detach(), "terms": out.terms, "report": out.report, "init": init,
        "grad_t2s": aligner.projectors.t2s.weight.grad.clone(), "grad_s2t": aligner.projectors.s2t.weight.grad.clone(),
        "grad_hs": hs.grad.clone(), "grad_zs": zs.grad.clone(), "grad_ws": ws_param.grad.clone(),
    }


def _body(rank: int, world: int, cross_map: VocabMap):
    group = torch.distributed.group.WORLD
    host = build_plugin_host(entry_points=False)
    fkl = host.build("objective", "forward_kl", {})
    skl = host.build("objective", "skew_kl", {})
    results = {}

    # -- DSKD, one vocabulary (real 37, padded 40 -> 20 per rank), pairs=None ---------------------------
    prob = _problem(0, 40, 40, 14, 14)
    labels = torch.randint(0, 37, (14,), generator=torch.Generator().manual_seed(1))
    labels[[3, 9]] = -100
    for name, cfg in {"same_argmax": {}, "same_gold": {"t2s_ce_target": "gold", "agreement_mask": False}}.items():
        results[name] = {"tp": _dskd_run(prob, group, cfg, None, None, labels, 37, 37, fkl),
                         "ref": _dskd_run(prob, None, cfg, None, None, labels, 37, 37, fkl)}

    # -- DSKD, two real tokenizers (300 -> pad 304, 500 -> pad 504), ETA-like pairs ----------------
    prob = _problem(2, 304, 504, 10, 16)
    pairs = (torch.tensor([0, 1, 3, 4, 6, 7, 9]), torch.tensor([0, 2, 5, 6, 9, 12, 15]))
    labels = torch.randint(1, 300, (10,), generator=torch.Generator().manual_seed(3))
    labels[4] = -100
    results["cross"] = {g: _dskd_run(prob, grp, {"objective": "skew_kl"}, cross_map, pairs, labels, 300, 500, skl)
                        for g, grp in (("tp", group), ("ref", None))}

    # -- ULD exact and top-k; ETA aligner ---------------------------------------------------------
    g = torch.Generator().manual_seed(4)
    zs_full, zt_full = torch.randn(10, 304, generator=g) * 2, torch.randn(16, 504, generator=g) * 2
    zs_full[:, 300:] = 50.0  # padding garbage must not count
    for name, part in (("uld", ULDAligner()), ("uld_top", ULDAligner(ULDAligner.Config(top_k=16))),
                       ("eta", ETAAligner())):
        if isinstance(part, ETAAligner):
            part.setup(vocab_map=cross_map, objective=fkl)
        res = {}
        for label, grp in (("tp", group), ("ref", None)):
            zs = _shard(zs_full.T, grp).T.clone().requires_grad_(True)
            zt = _shard(zt_full.T, grp).T
            out = part.loss(AlignerInputs(student_logits=zs, teacher_logits=zt, pairs=pairs, student_labels=labels,
                                          tp_group=grp, student_vocab_size=300, teacher_vocab_size=500,
                                          temperature=torch.linspace(0.8, 2.0, 6)))
            out.loss_sum.backward()
            res[label] = {"loss": out.loss_sum.detach(), "grad_zs": zs.grad.clone()}
        results[name] = res

    # -- identity: a teacher padded differently (real 37: student pad 40, teacher pad 48) -------------
    zt_full = torch.randn(5, 48, generator=g)
    like = IdentityAligner().teacher_logits_like_student(_shard(zt_full.T, group).T, 20, group, vocab_size=37)
    results["identity"] = {"tp": like, "ref": zt_full[:, rank * 20:(rank + 1) * 20]}

    # -- argmax ties resolve to the smallest global id on every rank ------------------------------
    ties = torch.zeros(3, 40)
    ties[:, [5, 25, 30]] = 1.0
    results["argmax"] = vocab_parallel_argmax(_shard(ties.T, group).T, group, 37)

    # -- DP: projector gradients averaged over the group -------------------------------------------
    aligner = DSKDAligner()
    aligner.build_projectors(D_S, D_T)
    for p in aligner.projectors.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    aligner.all_reduce_gradients(group)
    results["dp_grad"] = aligner.projectors.t2s.weight.grad.clone()
    return results


@pytest.fixture(scope="module")
def results():
    from test_aligners import docstrings, train_bpe  # tests/ is on sys.path (rootdir-relative imports)

    corpus = docstrings()
    s_tok, t_tok = train_bpe(300, corpus), train_bpe(500, corpus)
    return run_distributed(_body, world_size=2, args=(VocabMap.from_tokenizers(s_tok, t_tok),))


def _close(a, b, tol=2e-5):
    assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("case", ["same_argmax", "same_gold", "cross"])
def test_dskd_tp2_matches_tp1(results, case):
    for rank, res in enumerate(results):
        tp, ref = res[case]["tp"], res[case]["ref"]
        _close(tp["loss"], ref["loss"])
        for k in tp["terms"]:
            _close(tp["terms"][k], ref["terms"][k])
        for k in tp["init"]:
            _close(tp["init"][k], ref["init"][k], 1e-4)
        for k in ("grad_t2s", "grad_s2t", "grad_hs"):
            _close(tp[k], ref[k])
        vs_local = tp["grad_zs"].shape[-1]
        _close(tp["grad_zs"], ref["grad_zs"][:, rank * vs_local:(rank + 1) * vs_local])
        _close(tp["grad_ws"], ref["grad_ws"][rank * vs_local:(rank + 1) * vs_local])
        assert tp["report"] == ref["report"]
        assert ref["terms"]["t2s_ce"] > 0 and ref["terms"]["s2t_kd"] > 0
    # replicated projectors stay identical across ranks without any extra all-reduce
    for k in ("grad_t2s", "grad_s2t", "grad_hs"):
        assert torch.equal(results[0][case]["tp"][k], results[1][case]["tp"][k])


def test_dskd_cross_vocab_reports_coverage(results):
    rep = results[0]["cross"]["tp"]["report"]
    assert rep["aligned"] == 6.0 and rep["student_targets"] == 9.0 and rep["coverage"] == pytest.approx(6 / 9)


@pytest.mark.parametrize("case", ["uld", "uld_top", "eta"])
def test_uld_and_eta_tp2_match_tp1(results, case):
    for rank, res in enumerate(results):
        tp, ref = res[case]["tp"], res[case]["ref"]
        _close(tp["loss"], ref["loss"])
        width = tp["grad_zs"].shape[-1]
        _close(tp["grad_zs"], ref["grad_zs"][:, rank * width:(rank + 1) * width])
        assert ref["grad_zs"][:, 300:].abs().max() == 0


def test_identity_relayout_and_argmax_and_dp(results):
    for rank, res in enumerate(results):
        got, want = res["identity"]["tp"], res["identity"]["ref"]
        real = min(37 - rank * 20, 20)
        _close(got[:, :real], want[:, :real])
        assert res["argmax"].tolist() == [5, 5, 5]
        assert torch.equal(res["dp_grad"], torch.full_like(res["dp_grad"], 1.5))
