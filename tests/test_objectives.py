"""Every built-in objective at TP=1, 2 and 4 against a dense fp64 serial reference.

One 4-process gloo group for the whole module (TP=4 on it, TP=2 on two
subgroups; TP=1 unsharded in the parent): the rank body runs all objectives
(value and gradient, padded columns present, per-token and float
temperatures) and the parent compares. The same body also checks that an
input error seen by one rank only (NaN in its shard) makes every rank raise,
instead of deadlocking in a collective.
"""

from __future__ import annotations

import pytest
import torch

import distill_plugins
from distill_plugins.errors import InputError
from distill_plugins.testing.distributed import run_distributed
from objective_reference import CASES, case_id, reference_loss_and_grad

N_ROWS = 7
PADDED = 48  # divisible by 4
VOCAB = 33  # TP=4: rank 3 (columns 36..47) holds only padding; rank 2 is partly padded


def make_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = 3.0 * torch.randn(N_ROWS, PADDED, generator=gen)
    t = 3.0 * torch.randn(N_ROWS, PADDED, generator=gen)
    s[:, VOCAB:] = 100.0 * torch.randn(N_ROWS, PADDED - VOCAB, generator=gen)  # junk in padding must not matter
    t[:, VOCAB:] = float("-inf")
    tau = 0.5 + 1.5 * torch.rand(N_ROWS, generator=gen)
    return s, t, tau


def run_cases(s, t, tau, group, cols):
    """Loss and gradient of every case on this rank's column slice."""
    out = {}
    host = distill_plugins.build_plugin_host()
    for name, params in CASES:
        objective = host.build("objective", name, params)
        for tau_kind, temp in (("tensor", tau), ("float", 1.3)):
            x = s[:, cols].clone().requires_grad_(True)
            loss = objective(x, t[:, cols], temperature=temp, tp_group=group, vocab_size=VOCAB)
            loss.sum().backward()
            out[(case_id(name, params), tau_kind)] = (loss.detach(), x.grad.detach())
    return out


def shard_checks(rank, world_size, group, s, t, tau):
    """All cases plus the input-error checks on this rank's shard of a TP group of ``world_size``."""
    v_local = PADDED // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    results = run_cases(s, t, tau, group, cols)
    host = distill_plugins.build_plugin_host()
    # A NaN on the last rank only: every rank must raise the same InputError (no deadlock).
    s_nan = s.clone()
    s_nan[2, PADDED - 1] = float("nan")  # in the last rank's shard (vocab_size=None below: no padding)
    errors = {}
    for name in ("forward_kl", "csd", "jsd"):
        try:
            host.build("objective", name)(s_nan[:, cols], t[:, cols], tp_group=group, vocab_size=None)
            errors[name] = None
        except InputError as e:
            errors[name] = str(e)
    # A row whose real columns are all -inf, on every rank.
    t_inf = t.clone()
    t_inf[4, :] = float("-inf")
    try:
        host.build("objective", "reverse_kl")(s[:, cols], t_inf[:, cols], tp_group=group, vocab_size=VOCAB)
        errors["all_inf"] = None
    except InputError as e:
        errors["all_inf"] = str(e)
    return {"results": results, "errors": errors}


def rank_body(rank, world_size, s, t, tau):
    """One 4-process group: TP=4 on the world group, then TP=2 on groups {0, 1} and {2, 3}."""
    out = {4: shard_checks(rank, 4, torch.distributed.group.WORLD, s, t, tau)}
    pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    out[2] = shard_checks(rank % 2, 2, pairs[rank // 2], s, t, tau)
    return out


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.fixture(scope="module")
def references(inputs):
    s, t, tau = inputs
    refs = {}
    for name, params in CASES:
        refs[(case_id(name, params), "tensor")] = reference_loss_and_grad(name, params, s, t, tau, VOCAB)
        refs[(case_id(name, params), "float")] = reference_loss_and_grad(name, params, s, t, 1.3, VOCAB)
    return refs


@pytest.fixture(scope="module")
def tp_results(inputs):
    """{world_size: [per-rank dict]}; TP=1 runs unsharded in this process (tp_group=None)."""
    s, t, tau = inputs
    ranks = run_distributed(rank_body, 4, args=(s, t, tau))
    return {
        1: [{"results": run_cases(s, t, tau, None, slice(None)), "errors": {}}],
        2: [ranks[0][2], ranks[1][2]],
        4: [r[4] for r in ranks],
        "tp2_second_group": [ranks[2][2], ranks[3][2]],
    }


def assert_close(actual, expected, what, rtol=2e-5, atol=2e-6):
    actual = actual.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs().max()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g} > {bound.item():.3g}"


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_matches_dense_reference(tp_results, references, world_size, case):
    ranks = tp_results[world_size]
    for tau_kind in ("tensor", "float"):
        key = (case_id(*case), tau_kind)
        ref_loss, ref_grad = references[key]
        for rank, res in enumerate(ranks):
            loss, _ = res["results"][key]
            assert loss.dtype == torch.float32 and loss.shape == (N_ROWS,)
            assert_close(loss, ref_loss, f"{key} TP={world_size} rank {rank} loss")
        grad = torch.cat([res["results"][key][1] for res in ranks], dim=1)
        assert_close(grad, ref_grad, f"{key} TP={world_size} gradient")
        assert not bool(grad[:, VOCAB:].any()), "padded columns got a gradient"


@pytest.mark.parametrize("world_size", [2, 4])
def test_input_errors_raise_on_every_rank(tp_results, world_size):
    for rank, res in enumerate(tp_results[world_size]):
        errors = res["errors"]
        for name in ("forward_kl", "csd", "jsd"):
            assert errors[name] is not None, f"rank {rank}: {name} did not raise on NaN"
            assert "student_logits contains NaN" in errors[name]
        assert errors["all_inf"] is not None and "teacher_logits row 4 is -inf" in errors["all_inf"]


def test_tp2_groups_agree(tp_results):
    for (a, b) in zip(tp_results[2], tp_results["tp2_second_group"]):
        for key, (loss, grad) in a["results"].items():
            assert torch.equal(loss, b["results"][key][0]) and torch.equal(grad, b["results"][key][1])


def test_every_registered_objective_is_covered():
    names = set(distill_plugins.build_plugin_host().names("objective")) - {"taid"}
    assert names == {name for name, _ in CASES}
