"""Batched autoregressive generation from a megatron-core GPTModel under TP and PP.

Design
------
One function, :func:`generate`, takes a built ``GPTModel`` stage (student,
teacher, or a model imported from a Hugging Face directory or a megatron
checkpoint; DDP/Float16 wrappers are unwrapped), the prompts and a
:class:`GenerationConfig`, and returns the same :class:`GenerationResult` on
every rank of the model-parallel (TP x PP) group. Data-parallel replicas
generate independently from their own prompts; no collective crosses DP.

**KV cache: megatron-core's static inference context, our own loop.** Each
forward call passes a ``StaticInferenceContext`` as ``GPTModel.forward``'s
``inference_context``: megatron's attention keeps the keys and values of every
layer in ``[S_max, b, g, d]`` buffers, slices RoPE by cache position, and the
output layer materialises the logits of the last position only. We do not use
megatron's ``StaticInferenceEngine`` / ``TextGenerationController``: they need a
megatron tokenizer object, time steps with CUDA events and sample from one
shared generator; the loop here is ~100 lines, runs on the CPU layer
(:mod:`distill_plugins.engine.cpu`) under gloo, and gives every row its own
generator. No Hugging Face round trip.

**Prompts of different lengths.** Row ``i`` with prompt ``p_i`` of length
``L_i`` occupies cache positions ``0 .. L_i - 1`` and generates from position
``L_i`` on, with position ids ``0, 1, 2, ...`` of its own (as megatron's static
engine does). The loop runs one prefill over the shortest prompt length
``L_min`` for the whole batch, then one token per step: at step position ``t`` a
row with ``L_i > t`` is fed its own prompt token ``p_i[t]`` (and the sampled
token is discarded without touching its generator), a row with ``L_i <= t`` is
fed the token it generated. So a row only ever attends to its own real tokens
through the ordinary causal mask: no padding enters any row's computation, the
same maths as the row alone, and nothing depends on an attention backend
honouring a padding mask (transformer-engine's fused attention ignores one in
causal mode, and megatron's static context drops masks while decoding). Left-
padded inputs (a ``[b, s]`` tensor plus an attention mask, as data pipelines and
``transformers`` produce them) are accepted and stripped to these per-row
prompts. The cost: positions ``L_min .. L_max - 1`` of the longer prompts are
processed one step at a time rather than in the prefill; bucket prompts by
length when that matters.

**Choosing a token (last pipeline stage).** megatron gathers the logits of
the last position over TP in inference mode (``runtime_gather_output``), so
each TP rank of the last stage holds ``z`` of shape ``[b, V_padded]`` (one row
per sequence, never ``[b, s, V]``), bit-identical on every TP rank. Columns
``>= vocab_size`` (padding) are dropped first, so padded rows of the output
layer can never be chosen. Then, in fp32, per row ``i`` still generating:

* greedy (``temperature == 0``): ``argmax_v z_v`` (first index on ties, as ``torch.argmax``);
* sampled: ``z / T``; top-k keeps ``z_v >= z_(k)`` (the k-th largest); top-p keeps
  the smallest prefix of tokens sorted by probability whose mass reaches ``top_p``
  (the first is always kept); ``v ~ softmax`` of what is kept, drawn with
  ``torch.multinomial`` from row ``i``'s own ``torch.Generator``, seeded
  ``seeds[i]`` (default: a mix of ``config.seed`` and ``i``). A row's generator
  advances only on the steps where that row samples, so its draws do not depend
  on the other rows of the batch; with explicit ``seeds`` a row gives the same
  sample alone or in any batch (up to floating-point noise in the logits).

The chosen tokens ``[b]`` go from TP rank 0 of the last stage to its TP group,
then from the last stage to every stage over the PP group (``torch.distributed``
broadcasts on the explicit groups of the :class:`~distill_plugins.parallel.ParallelContext`).
Every rank then updates the same buffers and reaches the same stopping decision,
so no further agreement is needed. Between stages each step sends the
``[s, b, h]`` hidden states (``s = L_min`` in the prefill, 1 after) with
point-to-point ``send``/``recv`` on the PP group, like megatron's inference
wrappers.

**Stopping.** A row stops after emitting an ``eos_token_id`` (kept in its output)
or after ``max_new_tokens`` tokens; later positions hold ``pad_token_id``. The
loop ends as soon as every row has stopped.

**Model state.** The model is switched to eval mode and runs under
``torch.no_grad()`` (not ``inference_mode``: the returned tokens may feed a
training forward); its previous mode is restored afterwards, as is sequence
parallelism, which is switched off for the call (megatron's static inference
does not support it; it changes no maths). Dropout is off in eval mode.

Assumptions: every rank of a TP x PP group passes the same prompts (checked
once per call with one small all-gather per group; a mismatch raises instead of
hanging); the groups in ``context`` are the ones the model was built with
(megatron's ``parallel_state`` groups by default).

Usage::

    from distill_plugins.engine.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=64, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
    out = generate(model, [[1, 15, 27], [1, 8]], cfg, context=ctx)
    out.responses()            # [[...], [...]]: generated ids per row, EOS included when emitted
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from distill_plugins.engine import process_groups
from distill_plugins.errors import DistillError
from distill_plugins.interfaces import SamplingParams
from distill_plugins.logging import get_logger
from distill_plugins.parallel import ParallelContext, group_rank, group_size

__all__ = ["GenerationConfig", "GenerationProgress", "GenerationResult", "generate", "row_seeds",
           "select_tokens", "prompts_from_padded"]

log = get_logger(__name__)

Prompts = Union[Sequence[Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class GenerationConfig:
    """How :func:`generate` decodes.

    Attributes:
        max_new_tokens: tokens generated per row at most (>= 1).
        temperature: softmax temperature; ``0`` = greedy (argmax).
        top_k: keep the k most likely tokens before sampling (``0`` = all).
        top_p: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (``1`` = all); in ``(0, 1]``.
        seed: base seed of the per-row generators (row ``i`` gets
            ``row_seeds(seed, b)[i]`` unless :func:`generate` is given ``seeds``).
        eos_token_id: a token id, or several, that end a row (kept in its output);
            ``None`` = generate ``max_new_tokens`` always.
        pad_token_id: fills a row's output after it stopped; default the first
            EOS id, else 0.
        log_every: log a progress line every this many decoding steps (``0`` = never).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: Union[int, Sequence[int], None] = None
    pad_token_id: Optional[int] = None
    log_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DistillError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise DistillError(f"temperature={self.temperature!r}: expected a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise DistillError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = no top-k filter)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise DistillError(f"top_p={self.top_p!r}: expected a number in (0, 1] (1 = no nucleus filter)")
        if not isinstance(self.log_every, int) or self.log_every < 0:
            raise DistillError(f"log_every={self.log_every!r}: expected an integer >= 0 (0 = no progress log)")
        for tok in self.eos_ids:
            if not isinstance(tok, int) or tok < 0:
                raise DistillError(f"eos_token_id={self.eos_token_id!r}: expected non-negative token id(s)")
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, int) or self.pad_token_id < 0):
            raise DistillError(f"pad_token_id={self.pad_token_id!r}: expected a non-negative token id")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    @classmethod
    def from_sampling(cls, params: SamplingParams, **kwargs) -> "GenerationConfig":
        """A config from a sequence source's :class:`~distill_plugins.SamplingParams` (plus seed, EOS, ...)."""
        return cls(max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                   top_p=params.top_p, **kwargs)


@dataclass(frozen=True)
class GenerationProgress:
    """What the ``progress`` callback receives after every decoding step.

    Attributes:
        step: decoding steps done (forward calls, the prefill included).
        max_steps: steps at most (``L_max - L_min + max_new_tokens``).
        new_tokens: tokens generated so far, summed over rows.
        rows_done: rows that have stopped.
        rows: batch size.
        elapsed_s: seconds since the call started.
    """

    step: int
    max_steps: int
    new_tokens: int
    rows_done: int
    rows: int
    elapsed_s: float


@dataclass
class GenerationResult:
    """The output of :func:`generate`, identical on every rank of the TP x PP group.

    Attributes:
        tokens: int64 ``[b, n]``, the generated ids (``n <= max_new_tokens``: the
            longest output); row ``i`` is valid up to ``lengths[i]``, then ``pad_token_id``.
        lengths: int64 ``[b]``, tokens generated per row (an emitted EOS counts).
        finished: bool ``[b]``, whether the row stopped at an EOS.
        prompt_lengths: int64 ``[b]``, real (unpadded) prompt lengths.
        steps: forward calls made (prefill included).
        elapsed_s: wall time of the call.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    prompt_lengths: torch.Tensor
    steps: int
    elapsed_s: float

    def responses(self) -> list[list[int]]:
        """Generated ids per row, without padding (an emitted EOS is the last id)."""
        return [self.tokens[i, : int(n)].tolist() for i, n in enumerate(self.lengths)]


def row_seeds(seed: int, rows: int) -> list[int]:
    """Default per-row seeds: a fixed mix of ``seed`` and the row index (distinct rows, distinct seeds)."""
    return [(int(seed) * 1_000_003 + 7919 * (i + 1)) % (2**63 - 1) for i in range(rows)]


def prompts_from_padded(tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Per-row prompts from a left-padded ``[b, s]`` batch (``attention_mask`` 1 = real token).

    Raises:
        DistillError: shapes differ, or a row's real tokens are not a contiguous suffix
            (right padding or holes: the mask must be 0...0 1...1).
    """
    if tokens.dim() != 2:
        raise DistillError(f"prompt tensor has shape {tuple(tokens.shape)}; expected [batch, length]")
    if attention_mask is None:
        return tokens.tolist()
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise DistillError(f"attention_mask has shape {tuple(attention_mask.shape)} but the prompts have "
                           f"{tuple(tokens.shape)}")
    mask = attention_mask.to(torch.bool)
    out = []
    for i in range(tokens.shape[0]):
        n = int(mask[i].sum())
        if n and not bool(mask[i, tokens.shape[1] - n:].all()):
            raise DistillError(f"prompt row {i} is not left-padded (its attention_mask is "
                               f"{mask[i].int().tolist()}); pad on the left or pass a list of prompts")
        out.append(tokens[i, tokens.shape[1] - n:].tolist())
    return out


# ---------------------------------------------------------------------------
# Token choice
# ---------------------------------------------------------------------------


def _filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p on fp32 ``[r, V]`` logits; removed entries are -inf."""
    z = logits / config.temperature
    vocab = z.shape[-1]
    if 0 < config.top_k < vocab:
        kth = torch.topk(z, config.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if config.top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= config.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def select_tokens(logits: torch.Tensor, config: GenerationConfig, generators: Sequence[torch.Generator],
                  rows: torch.Tensor) -> torch.Tensor:
    """Choose the next token of each row in ``rows`` from full-vocabulary logits.

    Args:
        logits: ``[b, V]`` (real vocabulary only: padded columns already dropped).
        config: greedy when ``temperature == 0``, else temperature / top-k / top-p sampling.
        generators: one per row of ``logits``; only those of ``rows`` are advanced.
        rows: bool ``[b]``, the rows that choose a token this step.

    Returns:
        int64 ``[b]``: the chosen ids (-1 for rows not in ``rows``).
    """
    out = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    idx = rows.nonzero().flatten()
    if idx.numel() == 0:
        return out
    z = logits[idx].float()
    if config.greedy:
        out[idx] = torch.argmax(z, dim=-1)
        return out
    probs = torch.softmax(_filter_logits(z, config), dim=-1)
    for j, i in enumerate(idx.tolist()):
        out[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out


# ---------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (the object holding ``decoder``)."""
    m = model
    while not hasattr(m, "decoder") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "decoder") or not hasattr(m, "set_input_tensor"):
        raise DistillError(f"{type(model).__name__} is not a megatron GPTModel (or a wrapper of one); "
                           "pass the model stage itself, e.g. stage.student or stage.teacher")
    return m


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def _disable_sequence_parallel(model: torch.nn.Module) -> list[tuple[object, str, object]]:
    """Switch sequence parallelism off on every module; returns what to restore."""
    saved: list[tuple[object, str, object]] = []
    if not getattr(model.config, "sequence_parallel", False):
        return saved
    saved.append((model.config, "sequence_parallel", True))
    model.config.sequence_parallel = False
    for module in model.modules():
        for attr in _SP_ATTRS:
            if getattr(module, attr, None) is True:
                saved.append((module, attr, True))
                setattr(module, attr, False)
    return saved


class _Pipeline:
    """One model stage's forward through the KV cache, with hidden states passed over the PP group."""

    def __init__(self, model: torch.nn.Module, context: ParallelContext, cache: StaticInferenceContext):
        self.model = model
        self.cache = cache
        self.pp_group = context.pp_group
        self.pp_size = group_size(context.pp_group)
        self.pp_rank = group_rank(context.pp_group)
        self.first = self.pp_rank == 0
        self.last = self.pp_rank == self.pp_size - 1
        self.hidden = model.config.hidden_size
        self.dtype = model.config.pipeline_dtype or model.config.params_dtype

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.pp_group, stage)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Last-position logits ``[b, V_padded]`` (fp32) on the last stage, ``None`` elsewhere."""
        b, s = tokens.shape
        received = None
        if not self.first:
            received = torch.empty((s, b, self.hidden), dtype=self.dtype, device=tokens.device)
            dist.recv(received, src=self._peer(self.pp_rank - 1), group=self.pp_group)
        self.model.set_input_tensor(received)
        out = self.model(tokens, position_ids, None, inference_context=self.cache, runtime_gather_output=True)
        self.cache.increment_sequence_len_offset(s)
        if not self.last:
            dist.send(out.to(self.dtype).contiguous(), dst=self._peer(self.pp_rank + 1), group=self.pp_group)
            return None
        return out[:, -1, :].float()


def _broadcast_tokens(chosen: torch.Tensor, context: ParallelContext, last_stage: bool) -> torch.Tensor:
    """TP rank 0 of the last stage -> its TP group, then last stage -> every PP stage."""
    if last_stage and group_size(context.tp_group) > 1:
        dist.broadcast(chosen, src=dist.get_global_rank(context.tp_group, 0), group=context.tp_group)
    pp = group_size(context.pp_group)
    if pp > 1:
        dist.broadcast(chosen, src=dist.get_global_rank(context.pp_group, pp - 1), group=context.pp_group)
    return chosen


def _check_same_prompts(prompts: list[list[int]], context: ParallelContext, device) -> None:
    """Raise on every rank when the TP x PP group was handed different prompts (instead of hanging)."""
    total = sum(len(p) for p in prompts)
    digest = 0
    for i, p in enumerate(prompts):
        for j, t in enumerate(p):
            digest = (digest * 1_000_003 + (t + 1) * (j + 1) + i) % (2**61 - 1)
    mine = torch.tensor([len(prompts), total, digest], dtype=torch.long, device=device)
    for name, group in (("tensor", context.tp_group), ("pipeline", context.pp_group)):
        n = group_size(group)
        if n == 1:
            continue
        gathered = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(gathered, mine, group=group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise DistillError(f"generate(): the ranks of one {name}-parallel group were given different prompts "
                               f"(batch, tokens, digest per rank: {[g.tolist() for g in gathered]}); every rank "
                               "of a model-parallel group must pass the same prompts")


def _validate(prompts: list[list[int]], config: GenerationConfig, vocab_size: int, model) -> None:
    if not prompts:
        raise DistillError("generate(): no prompts (the batch is empty)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DistillError(f"generate(): prompt {i} is empty; every prompt needs at least one token "
                               "(e.g. the tokenizer's BOS)")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise DistillError(f"generate(): prompt {i} holds token id {bad[0]} outside the vocabulary "
                               f"[0, {vocab_size}); tokenize with the model's tokenizer")
    for tok in config.eos_ids:
        if tok >= vocab_size:
            raise DistillError(f"eos_token_id={tok} is outside the vocabulary [0, {vocab_size})")
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    max_pos = getattr(model, "max_sequence_length", None)
    if getattr(model, "position_embedding_type", None) == "learned_absolute" and max_pos and longest > max_pos:
        raise DistillError(f"generate(): the longest prompt ({longest - config.max_new_tokens} tokens) + "
                           f"max_new_tokens={config.max_new_tokens} = {longest} exceeds the model's "
                           f"max_position_embeddings={max_pos} (learned positions); lower max_new_tokens or "
                           "truncate the prompts")


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def generate(
    model: torch.nn.Module,
    prompts: Prompts,
    config: GenerationConfig = GenerationConfig(),
    *,
    context: Optional[ParallelContext] = None,
    attention_mask: Optional[torch.Tensor] = None,
    seeds: Optional[Sequence[int]] = None,
    vocab_size: Optional[int] = None,
    progress: Optional[Callable[[GenerationProgress], None]] = None,
) -> GenerationResult:
    """Generate continuations of ``prompts`` with this rank's stage of a GPTModel (collective over TP x PP).

    Args:
        model: this rank's ``GPTModel`` stage (or a DDP / Float16Module wrapper of it),
            built for the TP/PP layout of ``context``.
        prompts: a list of token-id lists (lengths may differ), or an int64 ``[b, s]``
            tensor, left-padded when ``attention_mask`` is given.
        config: decoding parameters (:class:`GenerationConfig`).
        context: the TP and PP groups; default megatron's ``parallel_state`` groups.
        attention_mask: ``[b, s]``, 1 on real prompt tokens, 0 on left padding.
        seeds: one generator seed per row (sampling only); default ``row_seeds(config.seed, b)``.
        vocab_size: real vocabulary size; default ``model.distill_layout.vocab_size``
            (models from :func:`distill_plugins.models.build.build_gpt_model`).
        progress: called on every rank after every step with a :class:`GenerationProgress`.

    Returns:
        A :class:`GenerationResult` (CPU tensors), the same on every rank of the TP x PP group.

    Raises:
        DistillError: empty or out-of-vocabulary prompts, too long for learned positions,
            ranks of one group given different prompts, a model that is not a GPTModel.
    """
    start_time = time.perf_counter()
    gpt = _unwrap(model)
    if vocab_size is None:
        layout = getattr(gpt, "distill_layout", None)
        if layout is None:
            raise DistillError("generate(): pass vocab_size= (the model was not built by "
                               "distill_plugins.models.build, so its real vocabulary is unknown)")
        vocab_size = layout.vocab_size
    if context is None:
        context = process_groups.parallel_context()
    if isinstance(prompts, torch.Tensor):
        prompt_lists = prompts_from_padded(prompts, attention_mask)
    else:
        if attention_mask is not None:
            raise DistillError("generate(): attention_mask is only meaningful with a [b, s] prompt tensor")
        prompt_lists = [[int(t) for t in p] for p in prompts]
    _validate(prompt_lists, config, vocab_size, gpt)
    b = len(prompt_lists)
    if seeds is not None and len(seeds) != b:
        raise DistillError(f"generate(): {len(seeds)} seeds for {b} prompts; pass one seed per prompt")
    device = next(gpt.parameters()).device
    _check_same_prompts(prompt_lists, context, device)

    lengths_in = torch.tensor([len(p) for p in prompt_lists], dtype=torch.long)
    l_min, l_max = int(lengths_in.min()), int(lengths_in.max())
    total = l_max + config.max_new_tokens
    pad = config.pad_id
    buf = torch.full((b, total), pad, dtype=torch.long)  # prompt + generated ids, natural positions
    for i, p in enumerate(prompt_lists):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    generated = torch.zeros(b, dtype=torch.long)
    finished = torch.zeros(b, dtype=torch.bool)  # stopped at EOS
    done = torch.zeros(b, dtype=torch.bool)  # stopped for any reason
    eos = torch.tensor(config.eos_ids, dtype=torch.long)
    generators = []
    if not config.greedy:
        for s in (list(seeds) if seeds is not None else row_seeds(config.seed, b)):
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            generators.append(g)

    cache = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
    pipe = _Pipeline(gpt, context, cache)
    was_training = gpt.training
    restore_sp = _disable_sequence_parallel(gpt)
    gpt.eval()
    max_steps = l_max - l_min + config.max_new_tokens
    steps = 0
    begin, end = 0, l_min  # cache positions fed in this step: [begin, end)
    try:
        with torch.no_grad():
            while True:
                chunk = buf[:, begin:end].to(device)
                positions = torch.arange(begin, end, device=device).unsqueeze(0).expand(b, -1)
                logits = pipe.forward(chunk, positions)
                steps += 1
                # rows whose prompt is consumed choose the token at position `end`
                choosing = (lengths_in <= end) & ~done
                chosen = torch.full((b,), -1, dtype=torch.long, device=device)
                if pipe.last:
                    chosen = select_tokens(logits[:, :vocab_size], config, generators, choosing.to(device))
                chosen = _broadcast_tokens(chosen, context, pipe.last).cpu()
                buf[choosing, end] = chosen[choosing]
                generated += choosing.long()
                if eos.numel():
                    hit = choosing & torch.isin(chosen, eos)
                    finished |= hit
                    done |= hit
                done |= generated >= config.max_new_tokens
                new_tokens = int(generated.sum())
                if progress is not None:
                    progress(GenerationProgress(steps, max_steps, new_tokens, int(done.sum()), b,
                                                time.perf_counter() - start_time))
                if config.log_every and steps % config.log_every == 0:
                    elapsed = time.perf_counter() - start_time
                    log.info("generate: step %d/%d, %d new tokens, %d/%d rows done, %.1f tok/s", steps, max_steps,
                             new_tokens, int(done.sum()), b, new_tokens / max(elapsed, 1e-9))
                if bool(done.all()) or end + 1 >= total:
                    break
                if bool((lengths_in <= end + 1).all()):
                    cache.enable_decode_mode()
                begin, end = end, end + 1
    finally:
        gpt.set_input_tensor(None)
        for obj, attr, value in restore_sp:
            setattr(obj, attr, value)
        gpt.train(was_training)

    width = int(generated.max())
    out = torch.full((b, width), pad, dtype=torch.long)
    for i in range(b):
        n = int(generated[i])
        out[i, :n] = buf[i, len(prompt_lists[i]): len(prompt_lists[i]) + n]
    elapsed = time.perf_counter() - start_time
    if config.log_every:
        log.info("generate: done, %d rows, %d new tokens in %d steps, %.2fs", b, int(generated.sum()), steps, elapsed)
    return GenerationResult(tokens=out, lengths=generated.clone(), finished=finished, prompt_lengths=lengths_in,
                            steps=steps, elapsed_s=elapsed)
