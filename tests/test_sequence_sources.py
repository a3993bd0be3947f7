"""Sequence sources (the fifth kind of part): decisions, schedules, registration through the hook."""

from __future__ import annotations

import textwrap

import pytest
import torch

from distill_plugins import build_plugin_host
from distill_plugins.errors import RecipeError
from distill_plugins.interfaces import FROM_DATASET, FROM_STUDENT, FROM_TEACHER
from distill_plugins.recipe.validate import validate_recipe_data


def _plan(source, n=64, step=0, seed=0):
    return source.plan(n, step=step, total_steps=100, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def host():
    return build_plugin_host()


def test_builtin_sources_are_registered_through_the_hook(host):
    assert {"dataset", "on_policy", "mixed", "teacher_generated"} <= set(host.names("sequence_source"))
    entry = host.registry("sequence_source").get("mixed")
    assert entry.plugin == "distill_plugins.builtin.sequences"


def test_dataset_on_policy_teacher_origins(host):
    assert (_plan(host.build("sequence_source", "dataset")).origin == FROM_DATASET).all()
    on = _plan(host.build("sequence_source", "on_policy", {"temperature": 0.7, "max_new_tokens": 9}))
    assert (on.origin == FROM_STUDENT).all() and on.sampling.temperature == 0.7 and on.sampling.max_new_tokens == 9
    assert (_plan(host.build("sequence_source", "teacher_generated")).origin == FROM_TEACHER).all()
    assert not host.part_class("sequence_source", "dataset").generates
    assert host.part_class("sequence_source", "mixed").generates


def test_mixed_lambda_extremes_and_fraction(host):
    assert (_plan(host.build("sequence_source", "mixed", {"lmbda": 0.0})).origin == FROM_DATASET).all()
    assert (_plan(host.build("sequence_source", "mixed", {"lmbda": 1.0})).origin == FROM_STUDENT).all()
    half = _plan(host.build("sequence_source", "mixed", {"lmbda": 0.5}), n=4000)
    frac = float((half.origin == FROM_STUDENT).float().mean())
    assert 0.46 < frac < 0.54
    assert set(half.origin.unique().tolist()) == {FROM_DATASET, FROM_STUDENT}


def test_mixed_is_reproducible_from_the_generator(host):
    src = host.build("sequence_source", "mixed", {"lmbda": 0.5})
    assert torch.equal(_plan(src, seed=3).origin, _plan(src, seed=3).origin)
    assert not torch.equal(_plan(src, seed=3).origin, _plan(src, seed=4).origin)


def test_mixed_lambda_schedule(host):
    src = host.build("sequence_source", "mixed", {"lmbda": 1.0, "lambda_start": 0.0, "lambda_warmup_steps": 10})
    assert src.current_lambda(0) == 0.0 and src.current_lambda(5) == 0.5 and src.current_lambda(20) == 1.0
    assert (_plan(src, step=0).origin == FROM_DATASET).all()
    assert (_plan(src, step=10).origin == FROM_STUDENT).all()


@pytest.mark.parametrize("params, needle", [
    ({"lmbda": 1.5}, "lmbda must be in [0, 1]"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
])
def test_bad_parameters_name_the_key(params, needle):
    with pytest.raises(RecipeError) as err:
        validate_recipe_data({"sequences": {"name": "mixed", **params}})
    assert needle in str(err.value)


def test_a_third_party_source_registered_through_the_hook_is_used_by_a_recipe(tmp_path, monkeypatch):
    (tmp_path / "replay_plugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import torch
        from distill_plugins import hookimpl, PartConfig, SequencePlan, SequenceSource

        class EveryOther(SequenceSource):
            @dataclass(frozen=True, kw_only=True)
            class Config(PartConfig):
                period: int = 2

            def plan(self, num_examples, *, step, total_steps, generator):
                origin = (torch.arange(num_examples) % self.config.period == 0).long()
                return SequencePlan(origin=origin)

        @hookimpl
        def distill_register_sequence_sources(register):
            register("every_other", EveryOther)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe, host = validate_recipe_data({"plugins": ["replay_plugin"], "sequences": {"name": "every_other", "period": 3},
                                         "data": {"kind": "instruct", "paths": ["embedded"]},  # a generating source
                                         "student": {"vocab_size": 64}, "teacher": {"vocab_size": 64}})
    assert recipe.sequences.name == "every_other" and recipe.sequences.params == {"period": 3}
    source = host.build("sequence_source", recipe.sequences.name, recipe.sequences.params)
    assert _plan(source, n=6).origin.tolist() == [FROM_STUDENT, 0, 0, FROM_STUDENT, 0, 0]
