"""TAID objective: interpolated-target KL vs a dense fp64 reference, gradients, t trajectory, state."""

from __future__ import annotations


import pytest
import torch

from distill_plugins.config import parse_dataclass
from distill_plugins.errors import InputError
from distill_plugins.interfaces import Objective, StepStats, TokenContext
from distill_plugins.objectives.taid import TAID, interpolated_kl
from distill_plugins.registry import Registry
from distill_plugins.selection.selectors import LATF
from distill_plugins.selection.temperature import IDTS

V_REAL, V_PAD = 11, 16


def logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V_PAD, generator=g) * 2
    x[:, V_REAL:] = 40.0  # padding garbage, must be ignored
    return x


def dense_taid(student, teacher, t, tau, form="kl"):
    """fp64 per-token loss over the real columns, target built from the detached student."""
    fs = student.double()[:, :V_REAL]
    ft = teacher.double()[:, :V_REAL]
    tau = tau.double().unsqueeze(-1) if isinstance(tau, torch.Tensor) else tau
    logp = torch.log_softmax(((1 - t) * fs.detach() + t * ft) / tau, dim=-1)
    logq = torch.log_softmax(fs / tau, dim=-1)
    p = logp.exp()
    return (p * (logp - logq)).sum(-1) if form == "kl" else -(p * logq).sum(-1)


@pytest.mark.parametrize("form", ["kl", "ce"])
@pytest.mark.parametrize("tau", [1.0, 0.7, "tensor"])
def test_loss_and_gradient_match_dense_reference(form, tau):
    student, teacher = logits(6, 1).requires_grad_(), logits(6, 2)
    if tau == "tensor":
        tau = torch.tensor([0.6, 1.0, 1.6, 0.9, 1.2, 2.0])
    weights = torch.arange(1.0, 7.0)
    got = interpolated_kl(student, teacher, 0.4, temperature=tau, vocab_size=V_REAL, loss_form=form)
    assert got.dtype == torch.float32 and got.shape == (6,)
    (got * weights).sum().backward()

    ref_student = student.detach().double().requires_grad_()
    want = dense_taid(ref_student, teacher, 0.4, tau, form)
    (want * weights.double()).sum().backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.grad[:, :V_REAL].double(), ref_student.grad[:, :V_REAL], atol=1e-5, rtol=1e-5)
    assert torch.all(student.grad[:, V_REAL:] == 0)


def test_kl_properties_and_endpoints():
    student, teacher = logits(5, 3), logits(5, 4)
    # t = 0: the target is the student itself
    assert interpolated_kl(student, teacher, 0.0, vocab_size=V_REAL).abs().max() < 1e-6
    # t = 1: plain forward KL(teacher || student), >= 0
    kl1 = interpolated_kl(student, teacher, 1.0, vocab_size=V_REAL)
    torch.testing.assert_close(kl1.double(), dense_taid(student, teacher, 1.0, 1.0), atol=1e-5, rtol=1e-5)
    assert torch.all(kl1 > 0)
    # CE = KL + H(p_t)
    ce = interpolated_kl(student, teacher, 0.4, vocab_size=V_REAL, loss_form="ce")
    kl = interpolated_kl(student, teacher, 0.4, vocab_size=V_REAL)
    assert torch.all(ce > kl)
    # -inf student logits in real columns do not produce NaN at the endpoints
    masked = student.clone()
    masked[:, 0] = float("-inf")
    assert torch.isfinite(interpolated_kl(masked, masked, 0.0, vocab_size=V_REAL)).all()


def test_bf16_inputs_and_empty_batch():
    student = logits(4, 5).bfloat16().requires_grad_()
    out = interpolated_kl(student, logits(4, 6).bfloat16(), 0.5, vocab_size=V_REAL)
    out.sum().backward()
    assert out.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    empty = torch.zeros(0, V_PAD, requires_grad=True)
    assert TAID()(empty, empty.detach(), vocab_size=V_REAL).shape == (0,)


def test_bad_temperature_and_shapes():
    x = logits(3, 0)
    with pytest.raises(InputError, match="shape"):
        interpolated_kl(x, x, 0.5, temperature=torch.ones(4))
    with pytest.raises(InputError, match="temperature"):
        interpolated_kl(x, x, 0.5, temperature=0.0)
    with pytest.raises(InputError, match="V_local"):
        interpolated_kl(x, x[:, :4], 0.5)


def step_all(taid: TAID, losses, start: int = 0, total: int = 10):
    out = []
    for i, loss in enumerate(losses, start=start + 1):
        taid.on_optimizer_step(StepStats(step=i, total_steps=total, kd_loss=loss))
        out.append(taid.t)
    return out


def test_t_trajectory_hand_computed_adaptive_and_cap():
    taid = TAID(TAID.Config(t_start=0.4, t_end=0.7, alpha=0.5, beta=0.5))
    # step 1: prev = 2, no update                                                   t = 0.4
    # step 2: delta = (2-1)/2 = 0.5, m = 0.25, sigmoid = 0.5621765,
    #         dt = 0.5 * 0.5621765 * 0.6 = 0.1686530; floor 0.46                     t = 0.5686530
    # step 3: delta = 0, m = 0.125, sigmoid = 0.5312094,
    #         dt = 0.5 * 0.5312094 * 0.4313470 = 0.1145678                             t = 0.6832207
    # step 4: delta = -3, m = -1.4375, dt = 0.0304002 -> 0.7136 > t_end              t = 0.7
    # step 5: NaN loss: skipped                                                      t = 0.7
    ts = step_all(taid, [2.0, 1.0, 1.0, 4.0, float("nan")])
    assert ts == pytest.approx([0.4, 0.5686530, 0.6832207, 0.7, 0.7], abs=1e-7)
    assert taid.momentum == pytest.approx(-1.4375) and taid.prev_loss == 4.0


def test_t_trajectory_hand_computed_linear_floor():
    taid = TAID(TAID.Config(t_start=0.4, t_end=0.8, alpha=0.2, beta=0.5))
    # step 2: dt = 0.2 * 0.5621765 * 0.6 = 0.0674612 -> 0.4674612 < floor 0.48          t = 0.48
    # step 3: m = 0.125, dt = 0.2 * 0.5312094 * 0.52 = 0.0552458 -> 0.5352458 > 0.52    t = 0.5352458
    # step 4: m = -1.4375, dt = 0.2 * 0.1919328 * 0.4647542 = 0.0178403 -> 0.5530861 < 0.56: t = 0.56
    ts = step_all(taid, [2.0, 1.0, 1.0, 4.0])
    assert ts == pytest.approx([0.4, 0.48, 0.5352458, 0.56], abs=1e-7)


def test_non_adaptive_follows_linear_schedule():
    taid = TAID(TAID.Config(t_start=0.2, t_end=1.0, adaptive=False))
    assert step_all(taid, [5.0, float("nan"), 1.0, 9.0], total=4) == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert taid.linear_t(8, 4) == 1.0


def test_state_round_trip_gives_same_next_t_and_loss():
    losses = [3.0, 2.5, 2.7, 2.0, 1.9, 1.95, 1.5]
    a = TAID(TAID.Config(alpha=0.05))
    step_all(a, losses[:4])
    b = TAID(TAID.Config(alpha=0.05))
    b.load_state_dict(a.state_dict())
    assert step_all(a, losses[4:], start=4) == step_all(b, losses[4:], start=4)
    assert a.state_dict() == b.state_dict()
    x, y = logits(3, 1), logits(3, 2)
    assert torch.equal(a(x, y, vocab_size=V_REAL), b(x, y, vocab_size=V_REAL))
    with pytest.raises(ValueError, match="momentum"):
        b.load_state_dict({"t": 0.5})


@pytest.mark.parametrize("params, key", [
    ({"t_start": 0.9, "t_end": 0.5}, "t_end=0.5"),
    ({"t_start": -0.1}, "t_start=-0.1"),
    ({"beta": 1.0}, "beta=1.0"),
    ({"alpha": -1e-3}, "alpha=-0.001"),
    ({"loss_form": "kld"}, "did you mean 'kl'"),
])
def test_bad_config_is_reported_with_key(params, key):
    obj, errors = parse_dataclass(TAID.Config, params, "objective 'taid'")
    assert obj is None and len(errors) == 1 and key in errors[0], errors


def test_registers_as_objective():
    reg = Registry("objective")
    reg.add("taid", TAID, plugin="test")
    taid = reg.build("taid", {"t_start": 0.2})
    assert isinstance(taid, Objective) and taid.t == 0.2


def test_composes_with_latf_and_idts_in_the_loss_glue_order():
    """drop masked rows -> select -> temperatures on kept rows -> objective -> tau^2 -> normalise."""
    student, teacher = logits(12, 7).requires_grad_(), logits(12, 8)
    labels = torch.tensor([1, -100, 2, 3, 4, -100, 5, 6, 7, 8, 9, 10])
    valid = labels != -100
    latf, idts, taid = LATF(LATF.Config(initial_ratio=0.5, min_ratio=0.5)), IDTS(), TAID()
    ctx = TokenContext(student_logits=student[valid], teacher_logits=teacher[valid], vocab_size=V_REAL)
    sel = latf.select(ctx)
    keep = sel.keep
    ctx_kept = TokenContext(student_logits=ctx.student_logits[keep], teacher_logits=ctx.teacher_logits[keep],
                            vocab_size=V_REAL)
    tau = idts.temperatures(ctx_kept, sel)
    per_token = taid(ctx_kept.student_logits, ctx_kept.teacher_logits, temperature=tau, vocab_size=V_REAL)
    loss = (per_token * tau**2).sum() / keep.sum()
    assert int(keep.sum()) == 5 and tau.shape == (5,)

    # dense fp64 reference of the same pipeline
    fs, ft = student.detach().double()[valid][:, :V_REAL], teacher.double()[valid][:, :V_REAL]
    p, q = fs.softmax(-1), ft.softmax(-1)
    hell = torch.sqrt(((p.sqrt() - q.sqrt()) ** 2).sum(-1) / 2)
    kept = torch.argsort(hell, descending=True)[:5].sort().values
    assert torch.nonzero(keep).flatten().tolist() == kept.tolist()
    s = hell[kept]
    ref_tau = torch.exp(-0.5 * torch.tanh(torch.log(s / s.median())))
    ref = (dense_taid(fs[kept], ft[kept], 0.4, ref_tau) * ref_tau**2).mean()
    torch.testing.assert_close(tau.double(), ref_tau, atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.all(student.grad[~valid] == 0) and torch.isfinite(student.grad).all()


def test_row_chunking_gives_the_same_loss_and_gradient(monkeypatch):
    from distill_plugins.selection import scores

    tau = torch.linspace(0.5, 2.0, 7)
    runs = []
    for chunk in (scores.CHUNK_ELEMENTS, 2 * V_PAD):
        monkeypatch.setattr(scores, "CHUNK_ELEMENTS", chunk)
        student = logits(7, 9).requires_grad_()
        loss = interpolated_kl(student, logits(7, 10), 0.3, temperature=tau, vocab_size=V_REAL)
        (loss * torch.arange(7.0)).sum().backward()
        runs.append((loss.detach(), student.grad))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
