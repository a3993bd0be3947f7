"""Sequence sources inside the training step: plan, generate, rebuild the batch (on-policy / mixed / SeqKD).

Design
------
A :class:`~distill_plugins.interfaces.SequenceSource` decides, for each example
of a microbatch, where its response comes from (``FROM_DATASET`` /
``FROM_STUDENT`` / ``FROM_TEACHER``). :class:`SequenceRuntime` carries out that
decision at the start of every optimizer step, before megatron's pipeline
schedule runs (:meth:`distill_plugins.engine.trainer.Trainer.train_step`):

1. pull the step's ``M`` microbatches of ``b`` rows from this rank's data
   iterator (every rank of a data-parallel replica pulls the same ones);
2. per microbatch ``k``: ``plan = source.plan(b, step=t, total_steps=T,
   generator=g)`` with a CPU ``torch.Generator`` seeded
   ``mix(seed, "plan", t, k, dp_rank)`` (stateless: the same on every TP/PP rank
   of the replica, the same again after a resume; ``t`` = optimizer steps done);
3. generate, in one call per model and sampling setting for the whole step,
   the responses of every row whose origin is the student
   (``stage.student``) or the teacher (``stage.teacher``) from its prompt
   (``prompt_tokens[i, s - L_i:]``, ``L_i = prompt_lengths[i]``) with
   :func:`~distill_plugins.engine.generate.generate`: every TP and PP rank of
   the replica takes part, eval mode, no gradient, the model's previous mode
   restored. Row ``i`` samples from its own generator seeded
   ``mix(seed, "row", t, sample_ids[i])``, so its response does not depend on
   the layout (TP, PP), on the batch it shares, or on the DP size;
   ``max_new_tokens`` is capped at ``s + 1 - min_i L_i`` (nothing longer fits
   the window); with learned absolute positions (``gpt2``) a prompt longer than
   ``max_position_embeddings - max_new_tokens`` is cut from the left for
   generation only;
4. rebuild each generated row exactly as :func:`distill_plugins.data.instruct.collate_instruct`
   builds a data row, from ``x = prompt + response`` (``n = |x|``, window
   ``w = s + 1``): when ``n > w`` the prompt keeps its last
   ``min(L, max(w - r, w // 2))`` tokens (``r = |response|``) and ``x`` its first
   ``w``; ``tokens = x[:s]`` right-padded with EOS, ``labels[j] = x[j + 1]`` where
   ``x[j + 1]`` is a response token, else -100 (prompt, padding), ``loss_mask =
   labels != -100``; ``position_ids``, ``sample_ids``, ``example_ids``,
   ``prompt_tokens``, ``prompt_lengths``, ``reference_texts`` are the data's. The
   batch gains ``response_origin`` (int64 ``[b]``, the plan). Rows whose origin
   is the data keep the data's tensors bit for bit, and a microbatch with no
   generated row is the data's batch itself, so ``mixed`` with ``lmbda: 0``
   trains exactly like ``dataset``.

Generation sees the same prompts on every rank of the replica and returns the
same tokens everywhere (:mod:`.generate`), so every pipeline stage rebuilds the
same batches without a collective. The teacher then scores the generated tokens
in the ordinary co-located pass, and objectives, selectors, temperature
policies and same-tokenizer aligners see an ordinary instruction batch.

Figures of a step (:meth:`SequenceRuntime.rollout`; identical on every rank):

* ``gen_s``: wall seconds spent planning, generating and rebuilding, the minimum over all ranks:
  the ranks reach the step at slightly different times and wait for each other in
  generation's first collective, so the last to arrive measures the generation itself;
* ``generated_tokens``: tokens generated over the data-parallel replicas (an emitted EOS counts);
* ``on_policy_fraction``: examples whose response was generated (student or teacher) / examples.

Refused (:func:`sequence_errors` at ``distill check``; again when the run is
built): a generating source without instruction data (no prompts), a source
that may plan teacher samples when no teacher is built (``loss.kd_weight: 0``),
a generating source with a teacher on its own ranks (``teacher_parallel``: the
teacher ranks read the data themselves) or with two tokenizers (the
cross-tokenizer aligners would need the generated text re-tokenized and
re-aligned for the teacher: not implemented).

Usage (what the trainer does)::

    runtime = SequenceRuntime.build(recipe, host, ctx=ctx, data=data, aligner=aligner_runtime)
    batches = [next(data) for _ in range(num_microbatches)]
    batches, figures = runtime.rollout(batches, stage, step=trainer.step, total_steps=recipe.training.steps)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from distill_plugins.data.instruct import instruct_tokenizer, kept_prompt_length
from distill_plugins.engine.generate import GenerationConfig, GenerationResult, generate
from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.interfaces import (FROM_DATASET, FROM_STUDENT, FROM_TEACHER, IGNORE_INDEX, SamplingParams,
                                        SequencePlan, SequenceSource)
from distill_plugins.logging import get_logger
from distill_plugins.parallel import ParallelContext, group_size
from distill_plugins.recipe.validate import sequence_errors

__all__ = ["SequenceRuntime", "RolloutRecord", "mix_seed", "plan_generator", "row_seed", "rebuild_batch",
           "GEN_METRICS"]

log = get_logger(__name__)

#: the step figures a generating source adds to metrics.jsonl
GEN_METRICS = ("gen_s", "generated_tokens", "on_policy_fraction")

_PLAN_TAG, _ROW_TAG = 0x5E0_1, 0x5E0_2
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 over the sequence); the same on every machine."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def plan_generator(seed: int, step: int, microbatch: int, dp_rank: int) -> torch.Generator:
    """The CPU generator a source's ``plan`` draws from for microbatch ``microbatch`` of step ``step``."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, _PLAN_TAG, step, microbatch, dp_rank))
    return g


def row_seed(seed: int, step: int, sample_id: int) -> int:
    """The sampling seed of the row holding global sample ``sample_id`` at step ``step``."""
    return mix_seed(seed, _ROW_TAG, step, sample_id)


def _prompt(batch: dict, row: int) -> list[int]:
    s = batch["prompt_tokens"].shape[1]
    n = int(batch["prompt_lengths"][row])
    return batch["prompt_tokens"][row, s - n:].tolist()


def rebuild_batch(batch: dict[str, Any], responses: Sequence[Optional[Sequence[int]]], origin: torch.Tensor, *,
                  pad_id: int) -> dict[str, Any]:
    """``batch`` with each row ``i`` whose ``responses[i]`` is not None rebuilt as prompt + that response.

    Args:
        batch: an instruction batch (:mod:`distill_plugins.data.instruct`), ``s`` = its width.
        responses: per row, the generated ids (EOS included when emitted), or None (keep the data's row).
        origin: int64 ``[b]``, the plan (stored as ``response_origin``).
        pad_id: right padding of rebuilt rows (the EOS id, as the data pads).

    Returns:
        A new dict (the input is not modified); see the module docstring for the layout.
    """
    tokens, labels = batch["tokens"].clone(), batch["labels"].clone()
    b, s = tokens.shape
    window = s + 1
    for i, response in enumerate(responses):
        if response is None:
            continue
        prompt = _prompt(batch, i)
        resp = [int(t) for t in response]
        if not resp:
            raise DistillError(f"row {i}: an empty generated response (generate() always returns at least one token)")
        keep = kept_prompt_length(len(prompt), len(prompt) + len(resp), window)
        x = torch.tensor(prompt[len(prompt) - keep:] + resp, dtype=torch.long)[:window]
        is_resp = torch.arange(len(x)) >= keep
        tokens[i].fill_(int(pad_id))
        tokens[i, :min(len(x), s)] = x[:s]
        labels[i].fill_(IGNORE_INDEX)
        labels[i, :len(x) - 1] = torch.where(is_resp[1:], x[1:], torch.full_like(x[1:], IGNORE_INDEX))
    out = dict(batch)
    out["tokens"], out["labels"] = tokens, labels
    out["loss_mask"] = (labels != IGNORE_INDEX).to(batch["loss_mask"].dtype)
    out["response_origin"] = origin.clone()
    return out


@dataclass
class RolloutRecord:
    """What the last :meth:`SequenceRuntime.rollout` did (for tests and plugin observers).

    Attributes:
        step: the optimizer step (steps done before it).
        plans: one :class:`~distill_plugins.SequencePlan` per microbatch.
        responses: per microbatch, per row, the generated ids or None.
        batches: the batches handed to the pipeline schedule.
        inputs: the data's batches they were built from.
    """

    step: int
    plans: list
    responses: list
    batches: list
    inputs: list


class SequenceRuntime:
    """A sequence source inside the engine (module docstring).

    Args:
        source: the built :class:`~distill_plugins.SequenceSource`.
        name: its registered name (for messages).
        ctx: this rank's groups (generation runs over TP x PP; figures reduce over DP).
        seed: the recipe's seed.
        eos_id: the end-of-sequence id (stops a response; pads rebuilt rows).
    """

    def __init__(self, source: SequenceSource, name: str, *, ctx: ParallelContext, seed: int, eos_id: int):
        self.source, self.name, self.ctx = source, name, ctx
        self.seed, self.eos_id = int(seed), int(eos_id)
        self.last: Optional[RolloutRecord] = None

    @property
    def generates(self) -> bool:
        """Whether the source may ask for generated responses (``dataset`` does not: no rollout at all)."""
        return bool(type(self.source).generates)

    @classmethod
    def build(cls, recipe: Any, host: Any, *, ctx: ParallelContext, data: Any = None, aligner: Any = None,
              teacher_provider: Any = None) -> "SequenceRuntime":
        """Build ``recipe.sequences`` through ``host`` and check it fits this run.

        Raises:
            RecipeError: the combinations of :func:`~distill_plugins.recipe.validate.sequence_errors`,
                a generating source with a teacher on its own ranks or with two tokenizers.
        """
        spec = recipe.sequences
        source = host.build("sequence_source", spec.name, dict(spec.params))
        errors = sequence_errors(recipe, type(source))  # the check-time rule, aligner aside (resolved below)
        if source.generates:
            if teacher_provider is not None and recipe.teacher_parallel is None:
                errors.append(f"sequences: {spec.name!r} generates responses, but the teacher runs on ranks of its "
                              "own, which read the data's responses themselves; use sequences: dataset")
            if aligner is not None and aligner.text_batches:
                errors.append(f"sequences: {spec.name!r} generates responses, but the student and the teacher have "
                              "different tokenizers: re-tokenizing generated text for the teacher's cross-tokenizer "
                              "aligner is not implemented; use one tokenizer or sequences: dataset")
        if errors:
            raise RecipeError(errors)
        source_data = getattr(data, "source", None)
        eos = getattr(source_data, "pad_id", None)
        if eos is None and source.generates:
            eos = instruct_tokenizer(recipe).eos_id
        return cls(source, spec.name, ctx=ctx, seed=recipe.seed, eos_id=eos if eos is not None else 0)

    # ------------------------------------------------------------------ planning
    def plan(self, num_examples: int, *, step: int, total_steps: int, microbatch: int) -> SequencePlan:
        """The source's checked plan for one microbatch."""
        gen = plan_generator(self.seed, step, microbatch, self.ctx.dp_rank)
        plan = self.source.plan(num_examples, step=step, total_steps=total_steps, generator=gen)
        origin = getattr(plan, "origin", None)
        if not isinstance(origin, torch.Tensor) or origin.shape != (num_examples,):
            raise DistillError(f"sequence source {self.name!r}: plan() must return a SequencePlan whose origin is a "
                               f"[{num_examples}] tensor, got {type(plan).__name__} with origin "
                               f"{getattr(origin, 'shape', origin)!r}")
        bad = ~torch.isin(origin, torch.tensor([FROM_DATASET, FROM_STUDENT, FROM_TEACHER]))
        if bool(bad.any()):
            raise DistillError(f"sequence source {self.name!r}: origin value {int(origin[bad][0])} is not "
                               "FROM_DATASET (0), FROM_STUDENT (1) or FROM_TEACHER (2)")
        if not isinstance(plan.sampling, SamplingParams):
            raise DistillError(f"sequence source {self.name!r}: plan.sampling must be a SamplingParams, got "
                               f"{type(plan.sampling).__name__}")
        return SequencePlan(origin=origin.to(torch.long).cpu(), sampling=plan.sampling)

    # ------------------------------------------------------------------ the step
    def rollout(self, batches: list[dict[str, Any]], stage: Any, *, step: int, total_steps: int
                ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Plan, generate and rebuild one step's microbatches (collective over every rank).

        Args:
            batches: this rank's microbatches of the step (instruction batches).
            stage: the :class:`~distill_plugins.engine.stage.DistillStage` (its ``student`` and ``teacher``).
            step: optimizer steps done; total_steps: ``training.steps``.

        Returns:
            The batches to train on and the step's figures (:data:`GEN_METRICS`), identical on every rank.
        """
        start = time.perf_counter()
        plans, jobs = [], {}
        for k, batch in enumerate(batches):
            if "prompt_tokens" not in batch or "prompt_lengths" not in batch:
                raise RecipeError(f"sequences: {self.name!r} needs the prompts of instruction data (data.kind: "
                                  f"instruct), but the batches hold {sorted(batch)}")
            b = batch["tokens"].shape[0]
            plan = self.plan(b, step=step, total_steps=total_steps, microbatch=k)
            plans.append(plan)
            for i in range(b):
                who = int(plan.origin[i])
                if who != FROM_DATASET:
                    jobs.setdefault((who, plan.sampling), []).append((k, i))
        responses: list[list[Optional[list[int]]]] = [[None] * b["tokens"].shape[0] for b in batches]
        generated = 0
        for (who, sampling), rows in sorted(jobs.items(), key=lambda kv: kv[0][0]):
            result = self._generate(who, sampling, batches, rows, stage, step)
            for (k, i), resp in zip(rows, result.responses()):
                responses[k][i] = resp
            generated += int(result.lengths.sum())
        out = [batch if plan.origin.eq(FROM_DATASET).all() else rebuild_batch(batch, resp, plan.origin, pad_id=self.eos_id)
               for batch, plan, resp in zip(batches, plans, responses)]
        self.last = RolloutRecord(step=step, plans=plans, responses=responses, batches=out, inputs=list(batches))
        examples = sum(int(p.origin.numel()) for p in plans)
        on_policy = sum(int((p.origin != FROM_DATASET).sum()) for p in plans)
        return out, self._figures(time.perf_counter() - start, generated, on_policy, examples)

    def _generate(self, who: int, sampling: SamplingParams, batches: list[dict], rows: list[tuple[int, int]],
                  stage: Any, step: int) -> GenerationResult:
        """Responses of ``rows`` (``(microbatch, row)`` pairs) from the student or the teacher, one call."""
        model = stage.student if who == FROM_STUDENT else stage.teacher
        if model is None:
            raise DistillError(f"sequence source {self.name!r} planned teacher samples, but no teacher is built "
                               "(loss.kd_weight: 0); give the loss a KD weight or plan student/dataset responses")
        prompts = [_prompt(batches[k], i) for k, i in rows]
        s = batches[rows[0][0]]["tokens"].shape[1]
        new = min(sampling.max_new_tokens, s + 1 - min(len(p) for p in prompts))  # nothing longer fits the window
        if getattr(model, "position_embedding_type", None) == "learned_absolute":
            # learned positions end at max_sequence_length: the generation prompt loses its left end to leave room
            max_pos = int(model.max_sequence_length)
            new = max(1, min(new, max_pos - 1))
            prompts = [p[-(max_pos - new):] for p in prompts]
        config = GenerationConfig.from_sampling(
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                           max_new_tokens=new), eos_token_id=self.eos_id, pad_token_id=self.eos_id)
        seeds = [row_seed(self.seed, step, int(batches[k]["sample_ids"][i])) if "sample_ids" in batches[k]
                 else mix_seed(self.seed, _ROW_TAG, step, k, self.ctx.dp_rank, i) for k, i in rows]
        return generate(model, prompts, config, context=self.ctx, seeds=seeds)

    def _figures(self, elapsed: float, generated: int, on_policy: int, examples: int) -> dict[str, float]:
        """DP sums of the counts, the world minimum of the time (module docstring): the same on every rank."""
        counts = torch.tensor([float(generated), float(on_policy), float(examples)], dtype=torch.float64)
        if group_size(self.ctx.dp_group) > 1:
            dist.all_reduce(counts, group=self.ctx.dp_group)
        wall = torch.tensor([elapsed], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(wall, op=dist.ReduceOp.MIN)
        gen, on, n = counts.tolist()
        return {"gen_s": float(wall.item()), "generated_tokens": gen, "on_policy_fraction": on / n if n else 0.0}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The source's own state (a schedule, a buffer); the sampling RNG is stateless (seeded per step)."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
