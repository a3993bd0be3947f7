"""Difficulty scores and token selectors: dense fp64 references and hand-computed cases."""

from __future__ import annotations


import pluggy
import pytest
import torch

from distill_plugins import hookspecs
from distill_plugins.config import parse_dataclass
from distill_plugins.errors import InputError, RecipeError
from distill_plugins.interfaces import StepStats, TokenContext, TokenSelector
from distill_plugins.registry import Registry
from distill_plugins.selection import scores as S
from distill_plugins.selection.selectors import (
    LATF,
    AdaSPEC,
    AllTokens,
    RandomFraction,
    TopFraction,
    kept_count,
    quantile_threshold,
    top_fraction_keep,
)

V_REAL, V_PAD = 13, 16


def padded_logits(n: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    """[n, V_PAD] logits whose padding columns hold large garbage (must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V_PAD, generator=g) * scale
    x[:, V_REAL:] = 30.0 + torch.rand(n, V_PAD - V_REAL, generator=g) * 10
    return x


def dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (log p, p) over the real columns only."""
    logp = torch.log_softmax(x.double()[:, :V_REAL], dim=-1)
    return logp, logp.exp()


def ref_scores(student, teacher, reference):
    logq, q = dense(student)
    logp, p = dense(teacher)
    logr, _ = dense(reference)
    return {
        "hellinger": torch.sqrt(((p.sqrt() - q.sqrt()) ** 2).sum(-1) / 2),
        "forward_kl": (p * (logp - logq)).sum(-1),
        "reverse_kl": (q * (logq - logp)).sum(-1),
        "student_entropy": -(q * logq).sum(-1),
        "loss_gap": (p * (logp - logq)).sum(-1) - (p * (logp - logr)).sum(-1),
    }


def ctx_for(student, teacher, reference=None, vocab_size=V_REAL, step=0, total=10) -> TokenContext:
    return TokenContext(student_logits=student, teacher_logits=teacher, vocab_size=vocab_size,
                        reference_logits=reference, step=step, total_steps=total)


# ---------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_match_dense_fp64_reference_with_padded_vocab(dtype):
    student, teacher, reference = (padded_logits(9, s).to(dtype) for s in (1, 2, 3))
    want = ref_scores(student, teacher, reference)
    tol = 1e-5
    for name in S.SCORE_NAMES:
        got = S.compute_score(name, ctx_for(student, teacher))
        assert got.dtype == torch.float32 and got.shape == (9,)
        torch.testing.assert_close(got.double(), want[name], atol=tol, rtol=tol, msg=name)
    gap = S.loss_gap(student, teacher, reference, vocab_size=V_REAL)
    torch.testing.assert_close(gap.double(), want["loss_gap"], atol=tol, rtol=tol)


def test_scores_are_detached_and_bounded():
    student = padded_logits(6, 4).requires_grad_()
    teacher = padded_logits(6, 5)
    for name in S.SCORE_NAMES:
        assert not S.compute_score(name, ctx_for(student, teacher)).requires_grad
    # identical distributions: 0; disjoint point masses: Hellinger 1 (up to fp32 underflow)
    same = S.hellinger(teacher, teacher, vocab_size=V_REAL)
    assert torch.all(same.abs() < 1e-6)
    a = torch.full((1, 4), -1e4)
    b = a.clone()
    a[0, 0] = b[0, 1] = 0.0
    assert S.hellinger(a, b).item() == pytest.approx(1.0, abs=1e-6)
    assert S.forward_kl(teacher, teacher, vocab_size=V_REAL).abs().max() < 1e-5


def test_scores_on_empty_input():
    empty = torch.zeros(0, V_PAD)
    for name in S.SCORE_NAMES:
        assert S.compute_score(name, ctx_for(empty, empty)).shape == (0,)


def test_unknown_score_name_raises():
    with pytest.raises(InputError, match="hellinger"):
        S.compute_score("helinger", ctx_for(padded_logits(2, 0), padded_logits(2, 1)))


# ---------------------------------------------------------------------------
# fixed-fraction selection
# ---------------------------------------------------------------------------


def test_kept_count():
    assert kept_count(10, 0.3) == 3
    assert kept_count(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in binary
    assert kept_count(3, 0.1) == 1  # at least one
    assert kept_count(7, 1.0) == 7
    assert kept_count(0, 0.5) == 0


def test_top_fraction_ties_break_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan")])
    assert top_fraction_keep(scores, 2 / 6).tolist() == [False, True, True, False, False, False]
    assert top_fraction_keep(scores, 0.5).tolist() == [False, True, True, False, True, False]
    assert top_fraction_keep(scores, 0.01).tolist() == [False, True, False, False, False, False]
    assert top_fraction_keep(torch.zeros(0), 0.5).shape == (0,)


def test_top_fraction_selector_ignores_padding_columns():
    teacher = padded_logits(6, 7)
    student = teacher.clone()
    # rows 0, 2, 4 differ only in the padding columns: their score must be 0
    student[[0, 2, 4], V_REAL:] += 100.0
    # rows 1, 3, 5 differ in real columns, increasingly
    for i, row in enumerate([1, 3, 5]):
        student[row, :V_REAL] += torch.linspace(0, 1 + i, V_REAL)
    sel = TopFraction(TopFraction.Config(fraction=0.5)).select(ctx_for(student, teacher))
    assert sel.keep.tolist() == [False, True, False, True, False, True]
    assert sel.normalize_by == "kept" and int(sel.keep.sum()) == 3
    assert torch.all(sel.scores[[0, 2, 4]] < 1e-6)
    # without telling it about the padding, the garbage columns would dominate
    bad = TopFraction(TopFraction.Config(fraction=0.5)).select(ctx_for(student, teacher, vocab_size=None))
    assert bad.keep.tolist() != sel.keep.tolist()


def test_all_tokens_keeps_everything():
    x = padded_logits(5, 1)
    sel = AllTokens().select(ctx_for(x, x))
    assert sel.keep.all() and sel.normalize_by == "kept" and sel.scores is None


def test_random_fraction_count_and_determinism():
    x = padded_logits(20, 1)
    a, b = RandomFraction(RandomFraction.Config(fraction=0.25, seed=3)), RandomFraction(
        RandomFraction.Config(fraction=0.25, seed=3))
    first = [a.select(ctx_for(x, x, step=s)).keep for s in (0, 0, 1)]
    second = [b.select(ctx_for(x, x, step=s)).keep for s in (0, 0, 1)]
    for k1, k2 in zip(first, second):
        assert int(k1.sum()) == 5 and torch.equal(k1, k2)
    assert not torch.equal(first[0], first[1])  # second micro-batch of the step draws afresh
    assert not torch.equal(first[0], first[2])
    other = RandomFraction(RandomFraction.Config(fraction=0.25, seed=4)).select(ctx_for(x, x)).keep
    assert not torch.equal(other, first[0])
    assert a.state_dict() == {}


# ---------------------------------------------------------------------------
# LATF
# ---------------------------------------------------------------------------

LATF_CFG = dict(warmup_fraction=0.2, ema_decay=0.5, ratio_step=0.1, loss_tolerance=0.05, min_ratio=0.5)
LOSSES = [4.0, 4.0, 2.0, 2.0, 2.5, 1.5, 1.0, 1.0, 4.0, float("nan")]
# Hand-computed (total 10 steps, warm-up while step <= 2):
# step L    ema    action                                      ratio after
#  1   4    4      warm-up                                     1
#  2   4    4      warm-up                                     1
#  3   2    3      first after warm-up: ref = 3                1
#  4   2    2.5    2.5 < 3*0.95 = 2.85: shrink, ref = 2.5      0.9
#  5   2.5  2.5    within [2.375, 2.625]: keep                 0.9
#  6   1.5  2.0    2.0 < 2.375: shrink, ref = 2.0              0.81
#  7   1    1.5    1.5 < 1.9: shrink, ref = 1.5                0.729
#  8   1    1.25   1.25 < 1.425: shrink, ref = 1.25            0.6561
#  9   4    2.625  2.625 > 1.3125: grow, ref = 2.625           0.72171
# 10   nan  -      skipped                                     0.72171
WANT_RATIO = [1, 1, 1, 0.9, 0.9, 0.81, 0.729, 0.6561, 0.72171, 0.72171]
WANT_EMA = [4, 4, 3, 2.5, 2.5, 2.0, 1.5, 1.25, 2.625, 2.625]


def run_latf(latf: LATF, losses, start: int = 0, total: int = 10):
    ratios = []
    for i, loss in enumerate(losses, start=start + 1):
        latf.on_optimizer_step(StepStats(step=i, total_steps=total, kd_loss=loss))
        ratios.append(latf.ratio)
    return ratios


def test_latf_ratio_trajectory_hand_computed():
    latf = LATF(LATF.Config(**LATF_CFG))
    emas = []
    for i, loss in enumerate(LOSSES, start=1):
        latf.on_optimizer_step(StepStats(step=i, total_steps=10, kd_loss=loss))
        emas.append(latf.ema)
        assert latf.ratio == pytest.approx(WANT_RATIO[i - 1], rel=1e-12), f"step {i}"
    assert emas == pytest.approx(WANT_EMA, rel=1e-12)
    assert latf.ref_loss == pytest.approx(2.625) and latf.step == 10


def test_latf_ratio_floor_and_cap():
    latf = LATF(LATF.Config(warmup_fraction=0.0, ema_decay=0.0, ratio_step=0.5, min_ratio=0.2, max_ratio=0.9,
                            initial_ratio=0.9))
    ratios = run_latf(latf, [8.0, 4.0, 2.0, 1.0, 0.5, 64.0, 1e4], total=7)
    assert ratios == pytest.approx([0.9, 0.45, 0.225, 0.2, 0.2, 0.3, 0.45])
    ratios = run_latf(latf, [1e6, 1e8], start=7, total=9)
    assert ratios == pytest.approx([0.675, 0.9])


def test_latf_selects_top_ratio_by_hellinger():
    latf = LATF(LATF.Config(**LATF_CFG))
    run_latf(latf, LOSSES[:7])
    assert latf.ratio == pytest.approx(0.729)
    student, teacher = padded_logits(10, 11), padded_logits(10, 12)
    sel = latf.select(ctx_for(student, teacher))
    h = ref_scores(student, teacher, teacher)["hellinger"]
    assert int(sel.keep.sum()) == 7 and sel.normalize_by == "kept"
    assert set(torch.nonzero(sel.keep).flatten().tolist()) == set(torch.argsort(h, descending=True)[:7].tolist())
    torch.testing.assert_close(sel.scores.double(), h, atol=1e-6, rtol=1e-6)


def test_latf_state_round_trip_gives_same_next_decisions():
    a = LATF(LATF.Config(**LATF_CFG))
    run_latf(a, LOSSES[:6])
    b = LATF(LATF.Config(**LATF_CFG))
    b.load_state_dict(a.state_dict())
    assert run_latf(a, LOSSES[6:], start=6) == run_latf(b, LOSSES[6:], start=6)
    assert a.state_dict() == b.state_dict()
    x, y = padded_logits(12, 1), padded_logits(12, 2)
    assert torch.equal(a.select(ctx_for(x, y)).keep, b.select(ctx_for(x, y)).keep)
    with pytest.raises(ValueError, match="ref_loss"):
        b.load_state_dict({"ratio": 1.0, "ema": None, "step": 0})


# ---------------------------------------------------------------------------
# AdaSPEC
# ---------------------------------------------------------------------------


def test_adaspec_kept_set_hand_computed():
    # teacher = reference = uniform over 2 tokens, so KL(p||q_ref) = 0 and the gap is
    # KL(p||q_student), increasing in |a| for student logits [0, a].
    a = torch.tensor([3.0, 0.0, 4.0, 1.0, 2.0])
    student = torch.stack([torch.zeros(5), a], dim=-1)
    teacher = torch.zeros(5, 2)
    sel = AdaSPEC().select(ctx_for(student, teacher, reference=teacher.clone(), vocab_size=None))
    # k = 0.4: threshold = quantile(gap, 0.6), position 0.6 * 4 = 2.4 -> between the 3rd and 4th
    # smallest (a = 2 and a = 3): keep a = 3 and a = 4, i.e. tokens 0 and 2.
    assert sel.keep.tolist() == [True, False, True, False, False]
    assert sel.normalize_by == "all" and sel.scores is None
    assert AdaSPEC.needs_reference_model and not LATF.needs_reference_model
    # a well-fitted reference removes a token: make the reference match the student on token 2
    reference = teacher.clone()
    reference[2] = student[2]
    sel = AdaSPEC().select(ctx_for(student, teacher, reference=reference, vocab_size=None))
    assert sel.keep.tolist() == [True, False, False, False, True]


def test_adaspec_matches_torch_quantile_rule_with_padding():
    student, teacher, reference = (padded_logits(50, s) for s in (21, 22, 23))
    gap = ref_scores(student, teacher, reference)["loss_gap"].float()
    for k in (0.1, 0.4, 0.77, 1.0):
        sel = AdaSPEC(AdaSPEC.Config(fraction=k)).select(ctx_for(student, teacher, reference))
        want = gap >= torch.quantile(gap, 1 - k)
        # fp32 rounding can only matter at the threshold itself
        assert (sel.keep != want).sum() <= 1
        assert int(sel.keep.sum()) == pytest.approx(max(1, round(50 * k)), abs=1)


def test_quantile_threshold_equals_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100):
        v = torch.randn(n, generator=g)
        for q in (0.0, 0.25, 0.6, 0.999, 1.0):
            assert quantile_threshold(v, q).item() == pytest.approx(torch.quantile(v, q).item(), abs=1e-6)


def test_adaspec_without_reference_logits_raises():
    x = padded_logits(3, 0)
    with pytest.raises(InputError, match="reference"):
        AdaSPEC().select(ctx_for(x, x))


# ---------------------------------------------------------------------------
# configs, registration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls, params, key", [
    (TopFraction, {"fraction": 1.5}, "fraction=1.5"),
    (TopFraction, {"fraction": 0}, "fraction=0"),
    (RandomFraction, {"fraction": -0.2}, "fraction=-0.2"),
    (AdaSPEC, {"fraction": 0.0}, "fraction=0.0"),
    (LATF, {"min_ratio": 0.0}, "min_ratio=0.0"),
    (LATF, {"ema_decay": 1.0}, "ema_decay=1.0"),
    (LATF, {"warmup_fraction": 1.2}, "warmup_fraction=1.2"),
    (LATF, {"loss_tolerance": -0.1}, "loss_tolerance=-0.1"),
    (LATF, {"initial_ratio": 0.5, "max_ratio": 0.4}, "max_ratio=0.4"),
    (LATF, {"score": "helinger"}, "did you mean 'hellinger'"),
    (TopFraction, {"score": "entropy"}, "'entropy' is not one of"),
    (LATF, {"warmup_fractoin": 0.1}, "did you mean 'warmup_fraction'"),
])
def test_bad_config_is_reported_with_key(cls, params, key):
    obj, errors = parse_dataclass(cls.Config, params, "selector")
    assert obj is None and len(errors) == 1
    assert key in errors[0], errors


def _registry() -> Registry:
    from distill_plugins.builtin import selectors as builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin)
    reg = Registry("token_selector")
    pm.hook.distill_register_token_selectors(register=lambda n, c: reg.add(n, c, plugin="builtin.selectors"))
    return reg


def test_builtin_plugin_registers_selectors_and_builds_from_recipe_params():
    reg = _registry()
    assert reg.names() == ["adaspec", "all", "latf", "random_fraction", "top_fraction"]
    latf = reg.build("latf", {"warmup_fraction": 0.1})
    assert isinstance(latf, LATF) and latf.config.warmup_fraction == 0.1 and latf.name == "latf"
    assert all(issubclass(reg.get(n).cls, TokenSelector) for n in reg.names())
    with pytest.raises(RecipeError, match="fraction=2.0"):
        reg.build("top_fraction", {"fraction": 2.0})


def test_row_chunking_gives_the_same_scores(monkeypatch):
    student, teacher, reference = (padded_logits(11, s) for s in (31, 32, 33))
    whole = {name: S.compute_score(name, ctx_for(student, teacher)) for name in S.SCORE_NAMES}
    gap = S.loss_gap(student, teacher, reference, vocab_size=V_REAL)
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", 3 * V_PAD)  # chunks of 3 rows: 3, 3, 3, 2
    assert len(S.chunk_rows(11, V_PAD)) == 4
    for name in S.SCORE_NAMES:
        torch.testing.assert_close(S.compute_score(name, ctx_for(student, teacher)), whole[name], atol=0, rtol=0)
    torch.testing.assert_close(S.loss_gap(student, teacher, reference, vocab_size=V_REAL), gap, atol=0, rtol=0)
