"""Built-in sequence sources: data, student samples (on-policy), a GKD mix, teacher samples (SeqKD).

Design
------
A :class:`~distill_plugins.interfaces.SequenceSource` only *decides*: for the
``b`` examples of a microbatch it returns ``origin [b]`` (dataset / student /
teacher) and the sampling parameters. Generating, masking the prompt and
scoring are the engine's (:mod:`distill_plugins.engine.sequences`), so every
objective, selector, temperature policy and aligner works unchanged on the
result, and a third-party source (a replay buffer, an adaptive mix) only
writes a decision rule.

Every random decision is drawn from the ``generator`` the engine passes: it is
seeded from (recipe seed, step, microbatch, data-parallel rank), so all ranks
of a replica agree without a collective and a resumed run makes the same
decisions.

The sources and their sources in the literature:

* ``dataset``: the data's responses (supervised KD; the default).
* ``on_policy``: every response sampled from the current student
  (Agarwal et al. 2024, GKD with lambda = 1; Lin et al. 2020 without annealing).
* ``mixed``: each example's response is the student's with probability
  ``lambda``, else the data's (GKD, arXiv 2306.13649, Algorithm 1 draws once per
  batch; here per example, which keeps the same expected on-policy fraction
  with less variance per step). ``lambda`` may move linearly from
  ``lambda_start`` to ``lambda`` over ``lambda_warmup_steps`` optimizer steps.
* ``teacher_generated``: every response sampled from the teacher
  (sequence-level KD, Kim and Rush 2016).

ImitKD's annealed mixture with a replay buffer and DistiLLM's adaptive
off-policy rule are left to plugins: their exact rules (buffer sizes, the
validation-loss trigger) are tied to their training scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill_plugins.interfaces import (FROM_DATASET, FROM_STUDENT, FROM_TEACHER, PartConfig, SamplingParams,
                                        SequencePlan, SequenceSource)

__all__ = ["DatasetSequences", "OnPolicySequences", "MixedSequences", "TeacherGeneratedSequences", "SamplingConfig"]


def _sampling_field(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, kw_only=True)
class SamplingConfig(PartConfig):
    """Sampling parameters shared by the generating sources."""

    temperature: float = _sampling_field(1.0, "sampling temperature; 0 = greedy")
    top_p: float = _sampling_field(1.0, "nucleus mass kept, in (0, 1]")
    top_k: int = _sampling_field(0, "keep the k most likely tokens; 0 = all")
    max_new_tokens: int = _sampling_field(64, "generated tokens per response at most (EOS stops earlier)")

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = all tokens), got {self.top_k!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)


class DatasetSequences(SequenceSource):
    """The data's own responses: no generation (today's behaviour)."""

    generates = False

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        pass

    def plan(self, num_examples, *, step, total_steps, generator):
        return SequencePlan(origin=torch.full((num_examples,), FROM_DATASET, dtype=torch.long))


class OnPolicySequences(SequenceSource):
    """Every response sampled from the current student (on-policy KD)."""

    Config = SamplingConfig

    def plan(self, num_examples, *, step, total_steps, generator):
        return SequencePlan(origin=torch.full((num_examples,), FROM_STUDENT, dtype=torch.long),
                            sampling=self.config.sampling())


class TeacherGeneratedSequences(SequenceSource):
    """Every response sampled from the teacher (sequence-level KD)."""

    Config = SamplingConfig
    samples_teacher = True

    def plan(self, num_examples, *, step, total_steps, generator):
        return SequencePlan(origin=torch.full((num_examples,), FROM_TEACHER, dtype=torch.long),
                            sampling=self.config.sampling())


class MixedSequences(SequenceSource):
    """GKD's mix: each example's response is the student's with probability lambda, else the data's.

    ``lambda_t = lambda_start + (lmbda - lambda_start) * min(1, step / lambda_warmup_steps)``
    (``lambda_warmup_steps: 0`` = constant ``lmbda``). ``lmbda: 0`` reproduces ``dataset``
    exactly; ``lmbda: 1`` is ``on_policy``. The key is ``lmbda`` because ``lambda`` is a
    Python keyword (TRL's GKDConfig spells it the same way).
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SamplingConfig):
        # ``lambda`` is a Python keyword, so the key is spelled ``lmbda`` (as in TRL's GKDConfig)
        lmbda: float = _sampling_field(0.5, "probability that an example's response is the student's")
        lambda_start: float = _sampling_field(-1.0, "lambda at step 0 when warming up; -1 = same as lmbda")
        lambda_warmup_steps: int = _sampling_field(0, "optimizer steps from lambda_start to lmbda; 0 = constant")

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.lmbda <= 1:
                raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda!r}")
            if self.lambda_start != -1.0 and not 0 <= self.lambda_start <= 1:
                raise ValueError(f"lambda_start must be in [0, 1] (or -1 = lmbda), got {self.lambda_start!r}")
            if self.lambda_warmup_steps < 0:
                raise ValueError(f"lambda_warmup_steps must be >= 0, got {self.lambda_warmup_steps!r}")

    def current_lambda(self, step: int) -> float:
        c = self.config
        start = c.lmbda if c.lambda_start < 0 else c.lambda_start
        if c.lambda_warmup_steps <= 0:
            return c.lmbda
        return start + (c.lmbda - start) * min(1.0, step / c.lambda_warmup_steps)

    def plan(self, num_examples, *, step, total_steps, generator):
        lam = self.current_lambda(step)
        draw = torch.rand(num_examples, generator=generator)
        origin = torch.where(draw < lam, FROM_STUDENT, FROM_DATASET).to(torch.long)
        return SequencePlan(origin=origin, sampling=self.config.sampling())
