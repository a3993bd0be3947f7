"""Contract checkers for token selectors, temperature policies and aligners (distill_plugins.testing.contracts).

Every built-in passes the serial checks; one of each kind also passes the TP=2
check (two gloo processes each, ~7 s); parts broken on purpose are caught, each
by the promise it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from distill_plugins import build_plugin_host
from distill_plugins.aligners import AlignerInputs, AlignerOutput, DSKDAligner, ETAAligner, ULDAligner, VocabMap
from distill_plugins.interfaces import PartConfig, Selection, TemperaturePolicy, TokenSelector, VocabAligner
from distill_plugins.parallel import all_reduce_sum
from distill_plugins.testing.contracts import (
    check_aligner_contract,
    check_selector_contract,
    check_temperature_contract,
)

HOST = build_plugin_host(entry_points=False)
VOCAB_MAP = VocabMap(torch.tensor([0, 1, 2, 3, 5, 8, 13, 15, 17, 20]), torch.tensor([0, 2, 1, 4, 6, 7, 12, 14, 16, 18]),
                     21, 19)


@pytest.mark.parametrize("name", HOST.names("token_selector"))
def test_builtin_selectors_pass(name):
    check_selector_contract(HOST.build("token_selector", name), distributed=False)


@pytest.mark.parametrize("name", HOST.names("temperature_policy"))
def test_builtin_temperature_policies_pass(name):
    check_temperature_contract(HOST.build("temperature_policy", name), distributed=False)


@pytest.mark.parametrize("name", HOST.names("vocab_aligner"))
def test_builtin_aligners_pass(name):
    setup = {"vocab_map": VOCAB_MAP} if name in ("eta", "dskd") else {}
    check_aligner_contract(HOST.build("vocab_aligner", name), setup=setup, distributed=False)


def test_one_tokenization_aligners_pass_without_pairs():
    for cls in (DSKDAligner, ULDAligner):
        check_aligner_contract(cls, paired=False, teacher_vocab_size=21, padded=(24, 24), n_teacher=12,
                               distributed=False)


def test_tp2_selector_policy_and_aligner():
    """One of each kind at TP=2 (stateful LATF, per-token IDTS, DSKD with projectors and a vocabulary map)."""
    check_selector_contract(HOST.build("token_selector", "latf", {"initial_ratio": 0.6, "warmup_fraction": 0.0}))
    check_temperature_contract(HOST.build("temperature_policy", "idts"))
    check_aligner_contract(DSKDAligner, setup={"vocab_map": VOCAB_MAP}, objective="skew_kl")


# ---------------------------------------------------------------------------
# Broken on purpose
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _NoParams(PartConfig):
    pass


class ShardLocalSelector(TokenSelector):
    """Keeps rows whose *local* shard maximum is positive: TP ranks see different shards."""

    Config = _NoParams

    def select(self, ctx):
        return Selection(keep=ctx.student_logits.detach().amax(dim=1) > 2.5)


class DataDependentState(TokenSelector):
    """Counts the tokens it kept into its state: DP ranks (different data) drift apart."""

    Config = _NoParams

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = 0

    def select(self, ctx):
        keep = ctx.teacher_logits[:, 0] > 0
        self.seen += int(keep.sum())
        return Selection(keep=keep)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class FloatMask(TokenSelector):
    Config = _NoParams

    def select(self, ctx):
        return Selection(keep=torch.ones(ctx.student_logits.shape[0]))


class AttachedTemperature(TemperaturePolicy):
    """Temperatures computed from the student logits without detaching them."""

    Config = _NoParams

    def temperatures(self, ctx, selection):
        return 1.0 + torch.sigmoid(all_reduce_sum(ctx.student_logits.float().sum(dim=1), ctx.tp_group))


class ColumnTemperature(TemperaturePolicy):
    Config = _NoParams

    def temperatures(self, ctx, selection):
        return torch.ones(ctx.student_logits.shape[0], 1)


class ForgetfulSchedule(TemperaturePolicy):
    """Keeps a step counter but saves only half of its state."""

    Config = _NoParams

    def __init__(self, config=None):
        super().__init__(config)
        self.steps, self.last_loss = 0, 0.0

    def on_optimizer_step(self, stats):
        self.steps, self.last_loss = stats.step, stats.kd_loss

    def temperatures(self, ctx, selection):
        return 1.0 + 0.1 * self.steps + self.last_loss

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class MeanAligner(VocabAligner):
    """Returns a mean over pairs instead of a sum, and lets the teacher logits get a gradient."""

    computes_loss = True
    Config = _NoParams

    def __init__(self, config=None, teacher_grad: bool = False):
        super().__init__(config)
        self.teacher_grad = teacher_grad

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        s, t = inputs.rows()
        zs = inputs.student_logits[s].float()
        zt = inputs.teacher_logits[t].float()
        if not self.teacher_grad:
            zt = zt.detach()
        width = min(inputs.student_vocab_size, inputs.teacher_vocab_size)  # one rank: the shared real columns
        per = ((zs[:, :width] - zt[:, :width]) ** 2).mean(dim=1) if width else zs.sum(dim=1) * 0.0
        total = per.sum() if self.teacher_grad else per.mean() if len(per) else inputs.student_logits.sum() * 0.0
        return AlignerOutput(total, int(s.numel()))


class LeakyTeacherAligner(MeanAligner):
    def __init__(self, config=None):
        super().__init__(config, teacher_grad=True)


@pytest.mark.parametrize("part,message", [
    (DataDependentState, "two data-parallel ranks that saw different batches"),
    (FloatMask, "Selection.keep must be a bool tensor"),
])
def test_broken_selectors_are_caught(part, message):
    with pytest.raises(AssertionError, match=message):
        check_selector_contract(part, distributed=False)


def test_shard_local_selector_is_caught_at_tp2():
    check_selector_contract(ShardLocalSelector, distributed=False)  # fine on one rank ...
    with pytest.raises(AssertionError, match="at TP=2 rank 1 keeps"):
        check_selector_contract(ShardLocalSelector)  # ... each TP rank keeps other rows


@pytest.mark.parametrize("part,message", [
    (AttachedTemperature, "temperatures require grad"),
    (ColumnTemperature, r"must return a float or fp32 \[N_kept\]"),
    (ForgetfulSchedule, "restored from state_dict"),
])
def test_broken_temperature_policies_are_caught(part, message):
    with pytest.raises(AssertionError, match=message):
        check_temperature_contract(part, distributed=False)


@pytest.mark.parametrize("part,message", [
    (MeanAligner, "not a sum over pairs"),
    (LeakyTeacherAligner, "the teacher's zt received a gradient"),
])
def test_broken_aligners_are_caught(part, message):
    with pytest.raises(AssertionError, match=message):
        check_aligner_contract(part, distributed=False)


def test_the_pytest_plugin_fixtures_are_documented():
    """Each fixture of the shipped pytest plugin has a docstring, and docs/writing_plugins.md lists its signature."""
    from pathlib import Path

    from distill_plugins.testing import pytest_plugin

    doc = (Path(__file__).resolve().parents[1] / "docs" / "writing_plugins.md").read_text()
    fixtures = {"distill_plugin_host": pytest_plugin.distill_plugin_host, "sharded_logits": pytest_plugin.sharded_logits,
                "token_context": pytest_plugin.token_context}
    for name, fixture in fixtures.items():
        fn: Any = getattr(fixture, "__wrapped__", fixture)
        assert (fn.__doc__ or "").strip(), f"fixture {name} has no docstring"
        assert f"`{name}`" in doc, f"docs/writing_plugins.md does not list fixture {name}"
    for signature in ("make(*modules: str) -> PluginHost",
                      "make(n_tokens, vocab_size, padded, world_size=1, seed=0) -> (student, teacher, shard)",
                      "make(n_tokens=8, vocab_size=21, padded=24, *, step=0, total_steps=10, seed=0) -> TokenContext"):
        assert signature in doc, f"docs/writing_plugins.md lacks the signature {signature}"
