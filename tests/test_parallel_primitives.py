"""The vocab-parallel primitives of distill_plugins.parallel, unsharded and on 2 gloo ranks.

One process group for the module: the rank body evaluates every primitive on
its shard (values and gradients) and the parent compares with dense
single-process computations.
"""

from __future__ import annotations

import pytest
import torch

from distill_plugins.errors import InputError
from distill_plugins.parallel import (
    all_reduce_max_packed,
    finite_shift,
    local_real_width,
    merge_partials,
    real_column_mask,
    row_chunks,
    vocab_parallel_expectation,
    vocab_parallel_log_softmax,
    vocab_parallel_logsumexp,
    vocab_parallel_softmax,
    vocab_parallel_sum,
)
from distill_plugins.testing.distributed import run_distributed

N, PADDED, VOCAB = 5, 16, 11  # TP=2: rank 1 holds columns 8..15, of which 8..10 are real


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    x = 4.0 * torch.randn(N, PADDED, generator=gen)
    v = torch.randn(N, PADDED, generator=gen)
    return x, v


def primitives(x, v, group, cols):
    """Every primitive on this rank's shard: values and the gradients of a fixed scalar of each."""
    out = {}
    fns = {
        "logsumexp": lambda xx, vv: vocab_parallel_logsumexp(xx, group, VOCAB),
        "log_softmax": lambda xx, vv: vocab_parallel_log_softmax(xx, group, VOCAB),
        "softmax": lambda xx, vv: vocab_parallel_softmax(xx, group, VOCAB),
        "expectation": lambda xx, vv: vocab_parallel_expectation(xx, vv, group, VOCAB),
        "sum": lambda xx, vv: vocab_parallel_sum(xx * vv, group, VOCAB),
    }
    weights = torch.linspace(0.5, 1.5, x.shape[1])[cols]  # a fixed, column-dependent upstream gradient
    for name, fn in fns.items():
        xx = x[:, cols].clone().requires_grad_(True)
        vv = v[:, cols].clone().requires_grad_(True)
        y = fn(xx, vv)
        if y.dim() == 2:  # per-column outputs: only real columns are meaningful
            width = local_real_width(xx.shape[1], group, VOCAB)
            scalar = (y[:, :width] * weights[:width]).sum()
        else:
            scalar = (y * torch.arange(1.0, N + 1)).sum()
        scalar.backward()
        out[name] = (y.detach(), xx.grad.detach(), vv.grad.detach() if vv.grad is not None else torch.zeros_like(vv))
    # merge_partials: per-shard logsumexp via local max + shifted sums, with a NaN flag on one row.
    shard = x[:, cols]
    xs = shard[:, : local_real_width(shard.shape[1], group, VOCAB)]
    local_max = xs.amax(1, keepdim=True) if xs.shape[1] else torch.full((N, 1), float("-inf"))
    shift = finite_shift(local_max)
    partials = torch.exp(xs - shift).sum(1, keepdim=True) if xs.shape[1] else torch.zeros(N, 1)
    flags = torch.zeros(N, 1)
    if cols.start == 0:
        flags[3] = 1.0
    gmax, sums, gflags = merge_partials(local_max, partials.clone(), (0,), group, flags)
    out["merged_lse"] = (gmax[:, 0] + torch.log(sums[:, 0]), gflags[:, 0])
    gmax2, _ = all_reduce_max_packed(local_max, group)
    out["max"] = gmax2[:, 0]
    return out


def rank_body(rank, world_size, x, v):
    group = torch.distributed.group.WORLD
    v_local = PADDED // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    out = primitives(x, v, group, cols)
    out["width"] = local_real_width(v_local, group, VOCAB)
    out["mask"] = real_column_mask(v_local, group, VOCAB)
    try:
        local_real_width(v_local, group, PADDED + 1)
        out["error"] = None
    except InputError as e:
        out["error"] = str(e)
    return out


@pytest.fixture(scope="module")
def tp2():
    x, v = make_inputs()
    return x, v, run_distributed(rank_body, 2, args=(x, v))


def dense(x, v):
    return primitives(x, v, None, slice(0, PADDED))


def test_local_real_width_and_mask(tp2):
    _, _, ranks = tp2
    assert [r["width"] for r in ranks] == [8, 3]
    assert ranks[0]["mask"].tolist() == [True] * 8
    assert ranks[1]["mask"].tolist() == [True] * 3 + [False] * 5
    assert all("vocab_size=17 is outside [1, 16]" in r["error"] for r in ranks)
    assert local_real_width(8, None, None) == 8
    with pytest.raises(InputError):
        local_real_width(8, None, 0)


def test_row_chunks_cover_rows_once():
    for n, width, budget in [(10, 3, 7), (10, 3, 1), (0, 5, 10), (5, 100, 1 << 18)]:
        rows = [i for sl in row_chunks(n, width, budget) for i in range(sl.start, sl.stop)]
        assert rows == list(range(n))


@pytest.mark.parametrize("name", ["logsumexp", "log_softmax", "softmax", "expectation", "sum"])
def test_primitives_match_dense(tp2, name):
    x, v, ranks = tp2
    ref_y, ref_gx, ref_gv = dense(x, v)[name]
    # the dense (unsharded) call against plain torch on the real columns
    xr, vr = x[:, :VOCAB].double(), v[:, :VOCAB].double()
    plain = {
        "logsumexp": torch.logsumexp(xr, -1),
        "log_softmax": torch.log_softmax(xr, -1),
        "softmax": torch.softmax(xr, -1),
        "expectation": (torch.softmax(xr, -1) * vr).sum(-1),
        "sum": (xr * vr).sum(-1),
    }[name]
    got = ref_y[:, :VOCAB] if ref_y.dim() == 2 else ref_y
    torch.testing.assert_close(got.double(), plain, rtol=1e-5, atol=1e-6)
    y = torch.cat([r[name][0] for r in ranks], 1) if ref_y.dim() == 2 else ranks[0][name][0]
    if ref_y.dim() == 2:
        torch.testing.assert_close(y[:, :VOCAB], ref_y[:, :VOCAB], rtol=1e-5, atol=1e-6)
    else:
        for r in ranks:
            torch.testing.assert_close(r[name][0], ref_y, rtol=1e-5, atol=1e-6)
    gx = torch.cat([r[name][1] for r in ranks], 1)
    gv = torch.cat([r[name][2] for r in ranks], 1)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-5, atol=1e-6)
    assert not bool(gx[:, VOCAB:].any())


def test_merge_partials_and_flags(tp2):
    x, _, ranks = tp2
    lse = torch.logsumexp(x[:, :VOCAB], -1)
    for r in ranks:
        merged, flags = r["merged_lse"]
        torch.testing.assert_close(merged, lse)
        assert flags.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # set on rank 0 only, seen by both
        torch.testing.assert_close(r["max"], x[:, :VOCAB].amax(1))
