"""Held-out evaluation of trained students against their teacher, on the CPU at TP=1.

Design
------
Training runs may use any TP layout; evaluation rebuilds every model at TP=1,
PP=1 in the calling process (megatron's ``parallel_state`` with a 1-rank gloo
group and the CPU layer), so numbers from a TP=2 run and a TP=1 run are
computed by the same code on the same tokens. Weights come from a run's final
checkpoint (:func:`load_run_weights`): its ``model_dist/`` (megatron
``dist_checkpointing``, which the engine writes with every checkpoint) is
loaded with :func:`distill_plugins.models.megatron_ckpt.load_megatron_checkpoint`,
which reshards to TP=1. Without ``model_dist/`` the per-rank
``rank_NNNNN.pt`` files of :mod:`distill_plugins.checkpoint.run_checkpoint` are
merged over TP (column- and row-parallel weights concatenated along megatron's
``partition_dim``; the gate and up halves of a SwiGLU ``fc1`` merged
separately; padded vocabulary rows dropped) and sharded back with
:func:`distill_plugins.models.build.load_full_state_dict` (PP=1 only).

Held-out tokens (:func:`heldout_windows`): the test split of an indexed
dataset, all documents concatenated (each already ends with the EOS id), cut
into non-overlapping windows of ``seq_length + 1`` tokens; window ``w``
predicts ``w[1:]`` from ``w[:-1]``. Every test token but the first of each
window is scored exactly once, so the numbers are over the whole split, not a
sample.

Metrics, per scored token with student distribution ``q`` and teacher ``p``
(real vocabulary only, fp32), averaged over tokens (:func:`compare_models`):

* ``ce``: ``-log q(label)``, the student's held-out cross-entropy (nats);
* ``teacher_ce``: the same for the teacher;
* ``fkl``: ``KL(p || q) = sum_v p (log p - log q)``, forward KL to the teacher;
* ``rkl``: ``KL(q || p)``, reverse KL;
* ``top1``: fraction of tokens where ``argmax q == argmax p``.

Generation (:func:`greedy_continuations`, :func:`rouge_l`): held-out documents
at least ``prompt + continuation`` tokens long give a prompt (their first
``prompt_tokens`` tokens: the header line and the start of the docstring) and
a reference (the next ``continuation_tokens`` tokens, decoded). The model
continues the prompt greedily (argmax, full recomputation each step; the
models are tiny) and stops at EOS; ROUGE-L F1 (``rouge-score``, no stemming,
x100) compares the decoded continuation with the reference, as the CSD and
AdaKD papers score responses (``rouge-score``, Google's reference
implementation, a core dependency).

Usage::

    with evaluation_context():
        teacher = build_eval_model(teacher_spec, vocab_size=V)
        load_run_weights(teacher, "runs/teacher/checkpoints")
        student = build_eval_model(student_spec, vocab_size=V)
        load_run_weights(student, "runs/student_csd/checkpoints")
        windows = heldout_windows(prefix, seq_length=128)
        metrics = compare_models(student, teacher, windows, vocab_size=V)
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core import parallel_state as ps

from distill_plugins.checkpoint import run_checkpoint as ckpt
from distill_plugins.data.indexed import read_documents
from distill_plugins.data.instruct import InstructSource, collate_instruct
from distill_plugins.data.tokenizer import Tokenizer
from distill_plugins.engine import process_groups as dps
from distill_plugins.engine.cpu import cpu_mode
from distill_plugins.engine.evaluation import rouge_l_f1
from distill_plugins.engine.generate import GenerationConfig, generate
from distill_plugins.errors import DistillError, InputError
from distill_plugins.logging import get_logger
from distill_plugins.models import build as models
from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec

log = get_logger(__name__)

__all__ = [
    "evaluation_context",
    "build_eval_model",
    "load_run_weights",
    "find_final_checkpoint",
    "heldout_windows",
    "heldout_prompts",
    "model_logits",
    "compare_models",
    "model_ce",
    "greedy_continuations",
    "rouge_l",
    "HeldOutMetrics",
    "InstructMetrics",
    "instruct_batches",
    "greedy_answers",
    "instruct_metrics",
    "teacher_logprobs",
]

PathLike = Union[str, Path]

_QUIET_WARNINGS = ("Apex is not installed", "full scope is deprecated", "`load_state_dict` is deprecated",
                   "deprecating ShardedTensor")

#: Evaluation builds every model with this layout (TP=1, PP=1).
EVAL_PARALLEL = ParallelSpec(tensor=1, pipeline=1, make_vocab_size_divisible_by=128)


# ---------------------------------------------------------------------------
# Process setup and models
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def evaluation_context(seed: int = 1234) -> Iterator[None]:
    """CPU layer plus a 1-rank megatron ``parallel_state`` (TP=1, PP=1) for the block.

    Reuses an already initialised TP=1, PP=1 state (nested use); tears down only
    what it created.
    """
    with cpu_mode(), warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:  # megatron's notices about optional CUDA packages and deprecations
            warnings.filterwarnings("ignore", message=f".*{re.escape(pattern)}")
        created = not ps.model_parallel_is_initialized()
        if created:
            dps.initialize(EVAL_PARALLEL, seed=seed, cpu=True)
        elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (1, 1):
            raise DistillError("evaluation needs TP=1, PP=1 but megatron parallel_state has other sizes")
        try:
            yield
        finally:
            if created:
                dps.destroy(destroy_process_group=True)


def build_eval_model(spec: ModelSpec, *, vocab_size: int, who: str = "model") -> torch.nn.Module:
    """A TP=1 GPTModel for ``spec`` in eval mode without gradients (inside :func:`evaluation_context`)."""
    model = models.build_gpt_model(spec, EVAL_PARALLEL, vocab_size=vocab_size, cpu=True, who=who)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# Weights from run checkpoints
# ---------------------------------------------------------------------------


def find_final_checkpoint(path: PathLike) -> Path:
    """The checkpoint to evaluate: ``path`` itself if it is one, else the latest valid one under it.

    Accepts a checkpoint (``.../step_000100``), a checkpoint root
    (``.../checkpoints``) or a run directory (``<output_dir>``, whose
    ``checkpoints/`` is searched).

    Raises:
        InputError: nothing valid found.
    """
    path = Path(path).expanduser()
    if (path / ckpt.METADATA).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            found = ckpt.find_latest_checkpoint(root)
            if found is not None:
                return found
    raise InputError(f"no complete checkpoint under {path} (expected step_NNNNNN/metadata.json there or in "
                     f"{path / 'checkpoints'}); did the run finish?")


def _strip_wrappers(state: dict) -> dict:
    """Drop DDP/Float16Module ``module.`` prefixes and non-tensor extra state."""
    out = {}
    for name, value in state.items():
        while name.startswith("module."):
            name = name[len("module."):]
        if torch.is_tensor(value) and "_extra_state" not in name:
            out[name] = value
    return out


def _merge_tp_shards(model: torch.nn.Module, shards: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Full-convention weights (see :mod:`distill_plugins.models.build`) from per-TP-rank state dicts."""
    layout = models.model_layout(model)
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    full: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        pieces = []
        for rank, shard in enumerate(shards):
            if name not in shard:
                raise DistillError(f"checkpoint rank file of TP rank {rank} has no {name!r}; was it saved by a "
                                   f"run of the same model shape? (has {sorted(shard)[:6]} ...)")
            pieces.append(shard[name])
        if len(pieces) == 1 or not getattr(param, "tensor_model_parallel", False):
            merged = pieces[0]
        else:
            dim = param.partition_dim
            if gated and models.canonical_name(name).endswith("mlp.linear_fc1.weight"):
                halves = [p.chunk(2, dim=dim) for p in pieces]
                merged = torch.cat([torch.cat([h[0] for h in halves], dim=dim),
                                    torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
            else:
                merged = torch.cat(pieces, dim=dim)
        fname = models.full_param_name(name, layout, tied=tied)
        if fname in ("embedding.word_embeddings.weight", "output_layer.weight"):
            merged = merged[: layout.vocab_size]
        full[fname] = merged.float()
    return full


def load_run_weights(model: torch.nn.Module, path: PathLike) -> Path:
    """Load a run's final student weights into a TP=1 model from :func:`build_eval_model`.

    Args:
        model: the TP=1, PP=1 model to fill.
        path: a checkpoint, checkpoint root or run directory (:func:`find_final_checkpoint`).

    Returns:
        The checkpoint directory used.

    Raises:
        InputError: no checkpoint; DistillError: a layout it cannot merge or a shape mismatch.
    """
    found = find_final_checkpoint(path)
    if (found / "model_dist").is_dir():
        load_megatron_checkpoint(model, str(found))
        return found
    meta = ckpt.read_metadata(found)
    world = int(meta.get("world_size", 1))
    layout = dict(meta.get("layout") or {})
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    if pp > 1 or (not layout and world > 1):
        raise DistillError(f"{found}: layout {layout or f'world {world}'} has pipeline stages and no model_dist/; "
                           "evaluation merges tensor-parallel shards only (save with sharded_model_state)")
    # megatron's rank order is tp-cp-ep-dp-pp: global ranks 0..tp-1 are data-parallel rank 0's TP shards.
    shards = []
    for rank in range(tp):
        state = ckpt.load_checkpoint(found, rank=rank, restore_rng=False).model_state
        if isinstance(state, list):  # virtual pipeline chunks; only one without PP
            state = state[0]
        shards.append(_strip_wrappers(state))
    models.load_full_state_dict(model, _merge_tp_shards(model, shards))
    return found


# ---------------------------------------------------------------------------
# Held-out data
# ---------------------------------------------------------------------------


def heldout_windows(prefix: PathLike, seq_length: int, *, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping ``[N, seq_length + 1]`` windows over an indexed dataset's documents (module docstring)."""
    docs = read_documents(prefix)
    stream = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, dtype=np.int64)
    n = (len(stream) - 1) // seq_length
    if max_windows is not None:
        n = min(n, max_windows)
    if n <= 0:
        raise InputError(f"{prefix}: {len(stream)} tokens are fewer than one window of {seq_length + 1}")
    idx = np.arange(n)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return torch.from_numpy(stream[idx])


def heldout_prompts(prefix: PathLike, *, prompt_tokens: int, continuation_tokens: int,
                    max_prompts: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompts ``[n, prompt_tokens]`` and reference continuations (token lists) from held-out documents.

    Takes the first ``max_prompts`` documents (file order, deterministic) with at
    least ``prompt_tokens + continuation_tokens`` tokens before their EOS.
    """
    prompts, refs = [], []
    for doc in read_documents(prefix):
        doc = doc.astype(np.int64)[:-1]  # drop the EOS the writer appended
        if len(doc) >= prompt_tokens + continuation_tokens:
            prompts.append(doc[:prompt_tokens])
            refs.append(doc[prompt_tokens:prompt_tokens + continuation_tokens].tolist())
            if len(prompts) == max_prompts:
                break
    if not prompts:
        raise InputError(f"{prefix}: no document has {prompt_tokens + continuation_tokens} tokens for a prompt")
    return torch.from_numpy(np.stack(prompts)), refs


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def model_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits ``[b, s, vocab_size]`` of a TP=1 GPTModel (padded vocabulary columns dropped)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    out = model(tokens, position_ids, None)
    return out[..., :vocab_size].float()


@dataclass
class HeldOutMetrics:
    """Token means over the held-out windows (nats for CE and KL; a fraction for top-1)."""

    ce: float
    teacher_ce: Optional[float]
    fkl: Optional[float]
    rkl: Optional[float]
    top1: Optional[float]
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def compare_models(student: torch.nn.Module, teacher: Optional[torch.nn.Module], windows: torch.Tensor, *,
                   vocab_size: int, batch_size: int = 16) -> HeldOutMetrics:
    """Student CE, and with a teacher its CE, forward/reverse KL and top-1 agreement (module docstring)."""
    sums = dict(ce=0.0, tce=0.0, fkl=0.0, rkl=0.0, top1=0.0)
    count = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        x, y = w[:, :-1], w[:, 1:].reshape(-1)
        logq = torch.log_softmax(model_logits(student, x, vocab_size).reshape(-1, vocab_size), dim=-1)
        sums["ce"] += -logq.gather(1, y[:, None]).sum().item()
        if teacher is not None:
            logp = torch.log_softmax(model_logits(teacher, x, vocab_size).reshape(-1, vocab_size), dim=-1)
            p, q = logp.exp(), logq.exp()
            sums["tce"] += -logp.gather(1, y[:, None]).sum().item()
            sums["fkl"] += (p * (logp - logq)).sum().item()
            sums["rkl"] += (q * (logq - logp)).sum().item()
            sums["top1"] += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
        count += y.numel()
    has_t = teacher is not None
    return HeldOutMetrics(ce=sums["ce"] / count, teacher_ce=sums["tce"] / count if has_t else None,
                          fkl=sums["fkl"] / count if has_t else None, rkl=sums["rkl"] / count if has_t else None,
                          top1=sums["top1"] / count if has_t else None, tokens=count)


@torch.no_grad()
def model_ce(model: torch.nn.Module, windows: torch.Tensor, *, vocab_size: int, batch_size: int = 16) -> float:
    """Held-out cross-entropy (nats per token) of one model."""
    return compare_models(model, None, windows, vocab_size=vocab_size, batch_size=batch_size).ce


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, *, new_tokens: int, vocab_size: int,
                         eos_id: Optional[int] = None, max_positions: Optional[int] = None,
                         batch_size: int = 32) -> list[list[int]]:
    """Greedy (argmax) continuations of ``prompts`` ``[n, P]``, each cut at its first EOS.

    ``max_positions`` (the model's ``max_position_embeddings``) bounds the
    context: longer contexts keep their last ``max_positions`` tokens.
    """
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        seq = prompts[i:i + batch_size].clone()
        new = []
        for _ in range(new_tokens):
            ctx = seq if max_positions is None else seq[:, -max_positions:]
            nxt = model_logits(model, ctx, vocab_size)[:, -1].argmax(-1)
            new.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        gen = torch.stack(new, dim=1).tolist()
        for row in gen:
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            outputs.append(row)
    return outputs


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (x100) of ``predictions`` against ``references``; NaN for no pairs.

    :func:`distill_plugins.engine.evaluation.rouge_l_f1` (``rouge-score``, no
    stemming), the function ``distill eval`` reports with.

    Raises:
        DistillError: the two lists differ in length.
    """
    if not predictions and not references:
        return float("nan")
    return rouge_l_f1(predictions, references)


# ---------------------------------------------------------------------------
# Instruction task: response-only metrics and greedy answers
# ---------------------------------------------------------------------------


@dataclass
class InstructMetrics:
    """Held-out instruction metrics of one model (:func:`instruct_metrics`).

    Attributes:
        response_ce: mean ``-log q(label)`` over the reference response tokens (nats per token).
        teacher_response_ce: the same for the teacher (None without one).
        fkl: mean ``KL(p || q)`` over the same positions (teacher ``p``, student ``q``).
        rkl: mean ``KL(q || p)``.
        rouge_l: mean ROUGE-L F1 (x100) of the greedy answers against the references (None: not generated).
        examples: held-out examples scored.
        response_tokens: labelled positions the token means run over.
        answer_tokens: mean generated tokens per answer (EOS included when emitted).
        samples: the first few ``{"prompt", "reference", "answer"}`` triples.
    """

    response_ce: float
    teacher_response_ce: Optional[float]
    fkl: Optional[float]
    rkl: Optional[float]
    rouge_l: Optional[float]
    examples: int
    response_tokens: int
    answer_tokens: Optional[float] = None
    samples: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)


def instruct_batches(source: InstructSource, *, batch_size: int = 32,
                     max_examples: Optional[int] = None) -> Iterator[dict]:
    """Every held-out example of ``source`` once, as batches of :func:`~distill_plugins.data.instruct.collate_instruct`.

    Global samples ``0 .. N-1`` are one epoch, so each example appears exactly
    once (in the split's seeded order); ``max_examples`` keeps the first ones.
    """
    n = source.num_samples if max_examples is None else min(source.num_samples, max_examples)
    for i in range(0, n, batch_size):
        yield collate_instruct(source, range(i, min(n, i + batch_size)))


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   eos_id: int, vocab_size: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy answers of a TP=1 model (inside :func:`evaluation_context`) to token-id ``prompts``.

    Uses :func:`distill_plugins.engine.generate.generate` (KV cache, per-row
    prompt lengths, stop at EOS). Prompts are batched by length (a batch's
    prompts differing in length are fed one position at a time past the
    shortest, so similar lengths keep the prefill long); greedy answers do not
    depend on the batch. Returns the generated ids per prompt in the given
    order, the EOS removed.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos_id)
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    out: list[list[int]] = [[] for _ in prompts]
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        chunk = [list(map(int, prompts[j])) for j in rows]
        for j, row in zip(rows, generate(model, chunk, config, vocab_size=vocab_size).responses()):
            out[j] = row[:-1] if row and row[-1] == eos_id else row
    return out


@torch.no_grad()
def teacher_logprobs(teacher: torch.nn.Module, source: InstructSource, *, vocab_size: int,
                     max_examples: Optional[int] = None, batch_size: int = 32) -> list[torch.Tensor]:
    """The teacher's fp32 log-probabilities ``[n_b, vocab_size]`` at the response positions of each held-out batch.

    Computed once and passed to :func:`instruct_metrics` as ``teacher`` when
    many students are scored against one teacher (same ``max_examples`` and
    ``batch_size``): the teacher's forward passes are then not repeated.
    """
    out = []
    for batch in instruct_batches(source, batch_size=batch_size, max_examples=max_examples):
        mask = batch["labels"] != -100
        out.append(torch.log_softmax(model_logits(teacher, batch["tokens"], vocab_size)[mask], dim=-1))
    return out


@torch.no_grad()
def instruct_metrics(student: torch.nn.Module, teacher, source: InstructSource,
                     tokenizer: Tokenizer, *, vocab_size: int, max_new_tokens: int = 64, generate_answers: bool = True,
                     max_examples: Optional[int] = None, batch_size: int = 32,
                     num_samples: int = 3) -> InstructMetrics:
    """Response CE, KL to the teacher and ROUGE-L of greedy answers on a held-out instruction split.

    With student ``q`` and teacher ``p`` (fp32, real vocabulary), over the
    positions ``i`` whose label is a reference response token (``labels[i] !=
    -100``: the prompt and the padding are excluded, as in training):

    * ``response_ce = mean_i -log q_i(label_i)``;
    * ``fkl = mean_i sum_v p_i,v (log p_i,v - log q_i,v)``, ``rkl`` the reverse;

    all teacher-forced on the reference. Then every prompt (everything before
    the response, its last ``seq_length`` tokens) is answered greedily (up to
    ``max_new_tokens``, stopping at EOS), the answer decoded and scored
    against the untruncated reference response with :func:`rouge_l`
    (``distill eval``'s :func:`~distill_plugins.engine.evaluation.rouge_l_f1`).

    Args:
        student: the model scored (TP=1, from :func:`build_eval_model`).
        teacher: the reference for the KL columns: a model, its :func:`teacher_logprobs`
            on the same examples and batch size, or None.
        source: the held-out split (:func:`distill_plugins.data.instruct.instruct_source`).
        tokenizer: decodes answers.
        vocab_size: real vocabulary size (padded columns are dropped).
        max_new_tokens: answer length limit.
        generate_answers: False skips generation (``rouge_l`` is None).
        max_examples: score only the first examples (None: the whole split).
    """
    sums = dict(ce=0.0, tce=0.0, fkl=0.0, rkl=0.0)
    count = examples = 0
    cached = isinstance(teacher, (list, tuple))
    for b, batch in enumerate(instruct_batches(source, batch_size=batch_size, max_examples=max_examples)):
        tokens, labels = batch["tokens"], batch["labels"]
        mask = labels != -100
        y = labels[mask]
        logq = torch.log_softmax(model_logits(student, tokens, vocab_size)[mask], dim=-1)
        sums["ce"] -= logq.gather(1, y[:, None]).sum().item()
        if teacher is not None:
            if cached and (b >= len(teacher) or teacher[b].shape != logq.shape):
                raise DistillError("instruct_metrics: the cached teacher log-probabilities were computed on other "
                                   "examples (compute them with the same max_examples and batch_size)")
            logp = teacher[b] if cached else torch.log_softmax(model_logits(teacher, tokens, vocab_size)[mask], dim=-1)
            sums["tce"] -= logp.gather(1, y[:, None]).sum().item()
            sums["fkl"] += (logp.exp() * (logp - logq)).sum().item()
            sums["rkl"] += (logq.exp() * (logq - logp)).sum().item()
        count += int(y.numel())
        examples += len(tokens)
    if count == 0:
        raise InputError(f"{source.description} ({source.split}): no response token to score")
    has_t = teacher is not None
    rouge = answer_tokens = None
    samples: list[dict] = []
    if generate_answers:
        order = [source.example_index(i) for i in range(examples)]
        prompts = [source.prompts[k] for k in order]
        answers = greedy_answers(student, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                 vocab_size=vocab_size)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]  # as distill eval decodes
        refs = [source.references[k] for k in order]
        rouge = rouge_l(texts, refs)
        answer_tokens = float(np.mean([len(a) for a in answers]))
        samples = [{"prompt": tokenizer.decode(list(map(int, prompts[j]))), "reference": refs[j], "answer": texts[j]}
                   for j in range(min(num_samples, len(texts)))]
    return InstructMetrics(response_ce=sums["ce"] / count, teacher_response_ce=sums["tce"] / count if has_t else None,
                           fkl=sums["fkl"] / count if has_t else None, rkl=sums["rkl"] / count if has_t else None,
                           rouge_l=rouge, examples=examples, response_tokens=count, answer_tokens=answer_tokens,
                           samples=tuple(samples))


def read_metrics(path: PathLike) -> list[dict]:
    """Records of a metrics JSONL file (blank and malformed lines skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records

