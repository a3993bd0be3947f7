"""Properties of the built-in objectives that need no process group (TP=1).

CSD against its O(V^2) pair form for all nine weight pairs, its invariances,
the CSD(S,S) = 2 x reverse-KL gradient identity, non-negativity, extreme and
low-precision inputs, chunking, input validation and a Hypothesis sweep
against the dense reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill_plugins
from distill_plugins.errors import InputError, RecipeError
from distill_plugins.objectives import CSD, ForwardKL
from objective_reference import CASES, case_id, csd_pair_form, csd_weights, reference_loss_and_grad

HOST = distill_plugins.build_plugin_host()
DIVERGENCES = [c for c in CASES if c[0] != "logit_mse"]


def build(name, **params):
    return HOST.build("objective", name, params)


def loss_and_grad(objective, s, t, **kw):
    x = s.detach().clone().requires_grad_(True)
    loss = objective(x, t, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad.detach()


def logits(n=5, v=40, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, v, generator=gen), scale * torch.randn(n, v, generator=gen)


# --------------------------------------------------------------------------- CSD


@pytest.mark.parametrize("w1", "UST")
@pytest.mark.parametrize("w2", "UST")
def test_csd_equals_pair_sum(w1, w2):
    s, t = logits(n=4, v=23, seed=1)
    wt = 1.7
    loss, grad = loss_and_grad(build("csd", w1=w1, w2=w2, weight_temperature=wt), s, t)
    a = s.double().requires_grad_(True)
    b = t.double()
    ref = csd_pair_form(a, b, csd_weights(w1, a, b, wt), csd_weights(w2, a, b, wt))
    (ref_grad,) = torch.autograd.grad(ref.sum(), a)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("w1,w2", [("S", "S"), ("U", "S"), ("T", "S"), ("U", "U"), ("T", "U")])
def test_csd_invariant_to_per_token_shift_of_student(w1, w2):
    s, t = logits(seed=2)
    shift = torch.tensor([0.0, 5.0, -40.0, 300.0, 1e3]).unsqueeze(1)
    objective = build("csd", w1=w1, w2=w2)
    loss, grad = loss_and_grad(objective, s, t, vocab_size=37)
    loss2, grad2 = loss_and_grad(objective, s + shift, t, vocab_size=37)
    torch.testing.assert_close(loss2, loss, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(grad2, grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("w1", "UST")
@pytest.mark.parametrize("w2", "UST")
def test_csd_zero_when_student_is_teacher_plus_constant(w1, w2):
    _, t = logits(seed=3)
    t = torch.round(t * 64) / 64  # so that t + shift is exact in fp32
    shift = torch.tensor([0.0, 1.0, -7.5, 250.0, 1e3]).unsqueeze(1)
    loss, grad = loss_and_grad(build("csd", w1=w1, w2=w2), t + shift, t, temperature=torch.full((5,), 0.8))
    assert loss.abs().max().item() < 1e-6
    assert grad.abs().max().item() < 1e-6


def test_csd_ss_gradient_is_twice_reverse_kl():
    s, t = logits(seed=4)
    tau = torch.tensor([0.5, 1.0, 1.3, 2.0, 0.9])
    _, g_csd = loss_and_grad(build("csd", w1="S", w2="S", weight_temperature=1.0), s, t, temperature=tau,
                             vocab_size=31)
    _, g_rkl = loss_and_grad(build("reverse_kl"), s, t, temperature=tau, vocab_size=31)
    torch.testing.assert_close(g_csd, 2.0 * g_rkl, rtol=1e-5, atol=1e-7)
    # ... and a weight temperature != 1 breaks the identity (the test can fail).
    _, g_hot = loss_and_grad(build("csd", w1="S", w2="S", weight_temperature=2.0), s, t, vocab_size=31)
    assert not torch.allclose(g_hot, 2.0 * g_rkl, atol=1e-4)


def test_csd_u_weights_ignore_padding():
    s, t = logits(n=3, v=20, seed=5)
    objective = build("csd", w1="U", w2="U")
    loss_pad, _ = loss_and_grad(objective, s, t, vocab_size=15)
    loss_real, _ = loss_and_grad(objective, s[:, :15].contiguous(), t[:, :15].contiguous())
    torch.testing.assert_close(loss_pad, loss_real)


# --------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_nonnegative_and_zero_at_equality(case):
    name, params = case
    objective = build(name, **params)
    s, t = logits(seed=6)
    loss, _ = loss_and_grad(objective, s, t, vocab_size=35)
    assert bool((loss >= 0).all())
    assert loss.max().item() > 1e-3  # different inputs give a clearly positive value
    same, grad = loss_and_grad(objective, t, t, vocab_size=35, temperature=torch.full((5,), 1.7))
    assert same.abs().max().item() < 1e-6
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_extreme_logits_are_finite(case):
    name, params = case
    gen = torch.Generator().manual_seed(7)
    sign = lambda: torch.where(torch.rand(4, 32, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    s, t = 1e4 * sign(), 1e4 * sign()
    s[:, 30:] = float("-inf")
    t[:, 30:] = float("-inf")
    loss, grad = loss_and_grad(build(name, **params), s, t, vocab_size=30)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_low_precision_inputs(case, dtype):
    name, params = case
    s, t = logits(seed=8)
    s, t = s.to(dtype), t.to(dtype)
    loss, grad = loss_and_grad(build(name, **params), s, t, vocab_size=38)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    # fp32 maths on the rounded inputs: same as the fp32 call on the upcast tensors.
    ref, ref_grad = loss_and_grad(build(name, **params), s.float(), t.float(), vocab_size=38)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float())


def test_neg_inf_in_real_columns_follows_zero_log_zero():
    s, t = logits(n=3, v=12, seed=9)
    t[0, 3] = float("-inf")  # teacher gives no mass: forward KL ignores the column
    s[1, 5] = float("-inf")  # student gives no mass: reverse KL ignores the column
    s[2, 7] = t[2, 7] = float("-inf")  # masked on both sides: CSD sees d = 0 there
    # Finite where the weighting distribution puts no mass on the -inf column; the
    # mixtures (jsd, tvd) are finite everywhere; KL(p||q) with q = 0 < p is +inf, as it should be.
    finite_rows = {"forward_kl": [0, 2], "reverse_kl": [1, 2], "jsd": [0, 1, 2], "tvd": [0, 1, 2], "csd": [1, 2]}
    for name, rows in finite_rows.items():
        loss, grad = loss_and_grad(build(name), s, t)
        assert bool(torch.isfinite(loss[rows]).all()), name
        assert bool(torch.isfinite(grad[rows]).all()), name
    assert loss_and_grad(build("forward_kl"), s, t)[0][1].item() == float("inf")
    for name, row in (("forward_kl", 0), ("reverse_kl", 1)):
        loss, grad = loss_and_grad(build(name), s[row:row + 1], t[row:row + 1])
        ref, ref_grad = reference_loss_and_grad(name, {}, s[row:row + 1], t[row:row + 1], 1.0, 12)
        torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("chunk_elements", [1, 7, 40, 10_000])
@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {}),
                                         ("csd", {"w1": "T", "w2": "S"}), ("logit_mse", {})])
def test_chunking_does_not_change_results(name, params, chunk_elements):
    s, t = logits(n=9, v=16, seed=10)
    ref = loss_and_grad(build(name, **params), s, t, vocab_size=13)
    objective = build(name, **params)
    objective.chunk_elements = chunk_elements
    out = loss_and_grad(objective, s, t, vocab_size=13)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_teacher_gets_no_gradient_and_empty_batch_works():
    s, t = logits()
    t.requires_grad_(True)
    x = s.clone().requires_grad_(True)
    build("csd")(x, t).sum().backward()
    assert t.grad is None and x.grad is not None
    empty = torch.zeros(0, 40, requires_grad=True)
    out = build("forward_kl")(empty, torch.zeros(0, 40))
    assert out.shape == (0,)
    out.sum().backward()


# --------------------------------------------------------------------------- validation


def test_input_errors():
    s, t = logits()
    objective = build("forward_kl")
    with pytest.raises(InputError, match=r"student_logits shape \(5, 40\) != teacher_logits shape \(5, 39\)"):
        objective(s, t[:, :39])
    with pytest.raises(InputError, match="vocab_size=41 is outside"):
        objective(s, t, vocab_size=41)
    with pytest.raises(InputError, match="temperature tensor has shape"):
        objective(s, t, temperature=torch.ones(4))
    with pytest.raises(InputError, match="temperature must be finite and > 0"):
        objective(s, t, temperature=0.0)
    bad = s.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="student_logits contains NaN"):
        objective(bad, t)
    bad = t.clone()
    bad[1, 0] = float("nan")
    for name in ("csd", "tvd", "logit_mse"):
        with pytest.raises(InputError, match="teacher_logits contains NaN"):
            build(name)(s, bad)
    bad = s.clone()
    bad[2, :30] = float("-inf")
    for name, _ in CASES:
        with pytest.raises(InputError, match="student_logits row 2 is -inf in every real vocabulary column"):
            build(name)(bad, t, vocab_size=30)
    with pytest.raises(InputError, match=r"\+inf"):
        objective(s, torch.full_like(t, float("inf")))


@pytest.mark.parametrize("name,params,message", [
    ("jsd", {"beta": 1.5}, "beta=1.5 is outside"),
    ("skew_kl", {"alpha": -0.1}, "alpha=-0.1 is outside"),
    ("skew_reverse_kl", {"alpha": 2}, "alpha=2.0 is outside"),
    ("csd", {"w1": "X"}, "'X' is not one of"),
    ("csd", {"weight_temperature": 0}, "weight_temperature=0.0 must be"),
    ("logit_mse", {"weight": "Q"}, "'Q' is not one of"),
])
def test_config_errors_name_key_and_value(name, params, message):
    with pytest.raises(RecipeError, match=message):
        build(name, **params)
    cls = HOST.part_class("objective", name)
    with pytest.raises((ValueError, TypeError)):
        cls.Config(**{k: v for k, v in params.items()})


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), n=st.integers(1, 4), v=st.integers(2, 20), pad=st.integers(0, 5),
       scale=st.floats(0.1, 20.0), tau=st.floats(0.3, 3.0), seed=st.integers(0, 2**16))
def test_matches_reference_on_random_shapes(case, n, v, pad, scale, tau, seed):
    name, params = case
    gen = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, v + pad, generator=gen)
    t = scale * torch.randn(n, v + pad, generator=gen)
    loss, grad = loss_and_grad(build(name, **params), s, t, temperature=tau, vocab_size=v)
    ref, ref_grad = reference_loss_and_grad(name, params, s, t, tau, v)
    # fp32 rounding scales with the terms summed, not with the result: CSD's value is a difference
    # of weighted means of d**2 (d = (s - t) / tau), which can cancel to a much smaller number.
    d_scale = ((s - t)[:, :v] / tau).abs().max().item()
    bound = 1e-5 * (1 + ref.abs().max().item()) + 1e-6 * d_scale ** 2
    assert (loss.double() - ref).abs().max().item() <= bound
    gbound = 1e-5 * (1 + ref_grad.abs().max().item())
    assert (grad.double() - ref_grad).abs().max().item() <= gbound


def test_classes_are_importable_and_documented():
    for cls in (CSD, ForwardKL):
        assert "Tensor contract" in cls.__doc__ or "contract" in cls.__doc__
