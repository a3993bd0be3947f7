"""Generation-based evaluation on a held-out instruction split: response CE, KL to the teacher, ROUGE-L.

Design
------
One function, :func:`evaluate_instruct`, scores the student of a built
:class:`~distill_plugins.engine.run.Engine` (any TP x PP x DP layout) on the
first ``N`` examples of a held-out split of ``data.kind: instruct`` data (the
split's seeded order, one epoch: every example once). ``distill eval``
(:mod:`distill_plugins.cli.eval`) and the in-run evaluation
(``training.eval_generate``, :class:`~distill_plugins.engine.callbacks.EvaluationSchedule`)
both call it, so the two report the same figures for the same weights.

**Teacher-forced figures.** The reference conversations run through the
engine's :class:`~distill_plugins.engine.stage.DistillStage` under megatron's
forward-only pipeline schedule (student and frozen teacher side by side, as in
training; the fused output layer is switched off for the pass so the last stage
holds vocab-parallel logits). With student ``q_i`` and teacher ``p_i`` at
position ``i`` (fp32 softmax over the real vocabulary, padded columns dropped)
and ``R`` the positions whose label is a reference response token (``labels !=
-100``: prompts, system/user turns and padding excluded, as in training)::

    response_ce         = (1/|R|) sum_{i in R} -log q_i(y_i)                      nats/token
    teacher_response_ce = (1/|R|) sum_{i in R} -log p_i(y_i)
    kl                  = (1/|R|) sum_{i in R} sum_v p_i(v) (log p_i(v) - log q_i(v))   KL(teacher || student)

Each TP rank sums its vocabulary shard and the sums are all-reduced over TP;
the per-microbatch sums are all-reduced over DP and broadcast from the last
pipeline stage (:func:`~distill_plugins.engine.trainer.reduce_reports`), so
every rank returns the same numbers.

**Greedy answers and ROUGE-L.** Every example's generation prompt (everything
before its last response, its last ``data.seq_length`` tokens; with learned
positions also at most ``max_position_embeddings - max_new_tokens`` tokens) is
answered by the student with :func:`~distill_plugins.engine.generate.generate`
(greedy, at most ``max_new_tokens`` tokens, stops at the tokenizer's EOS;
collective over TP x PP, DP ranks answer their own examples, in batches of
``generation_batch_size`` prompts of similar lengths: a batch decodes one token
at a time from its shortest prompt on, so mixed lengths cost steps). The answer is
decoded without the EOS and special tokens and compared with the untruncated
reference answer (the last assistant message) by :func:`rouge_l_f1`::

    LCS(a, r)  = longest common subsequence of the tokens of answer a and reference r
    P = LCS / |a|,   R = LCS / |r|,   F1 = 2PR / (P + R)   (0 when LCS = 0)
    rouge_l    = 100 * mean over examples of F1

computed by Google's ``rouge-score`` package (``RougeScorer(["rougeL"])``: its
default tokenizer lower-cases and splits on non-alphanumerics; no stemming),
the implementation the CSD and AdaKD papers report.

Examples are dealt to DP ranks as the data iterators deal samples: microbatch
``k`` of DP rank ``r`` holds samples ``[k*b*D + r*b, k*b*D + (r+1)*b)`` (``b =
training.micro_batch_size``, ``D`` the DP size); rows past ``N`` are padding
(no labels, not generated), so every DP rank runs the same number of microbatches.

Usage::

    engine = Engine(recipe, host, cpu=True)          # student weights from student.checkpoint / hf / megatron
    result = evaluate_instruct(engine, max_new_tokens=64)
    result.metrics   # {"eval_response_ce": ..., "eval_kl": ..., "eval_rouge_l": ..., "eval_examples": ...}
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from rouge_score import rouge_scorer

from distill_plugins.data.instruct import InstructSource, collate_instruct, instruct_source, instruct_tokenizer
from distill_plugins.data.progress import Progress
from distill_plugins.data.stream import rank0_first
from distill_plugins.data.tokenizer import Tokenizer
from distill_plugins.engine.generate import GenerationConfig, GenerationProgress, generate
from distill_plugins.engine.stage import forward_backward
from distill_plugins.engine.trainer import reduce_reports
from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.logging import get_logger
from distill_plugins.parallel import all_reduce_sum_, group_size, local_real_width, row_chunks, \
    vocab_parallel_log_softmax, vocab_shard_start

if TYPE_CHECKING:  # type-only: run.py imports callbacks, which imports this module
    from distill_plugins.engine.run import Engine

__all__ = ["rouge_l_scores", "rouge_l_f1", "InstructEvaluation", "check_instruct_recipe", "held_out_source",
           "evaluate_instruct", "EVAL_SPLITS"]

log = get_logger(__name__)

#: held-out splits ``distill eval --split`` accepts
EVAL_SPLITS = ("valid", "test")
_SUM_KEYS = ("ce_sum", "teacher_ce_sum", "kl_sum", "response_tokens")
#: fp32 elements of one row chunk of the teacher-forced pass (64 MiB per temporary)
EVAL_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> list[float]:
    """Per-pair ROUGE-L F1 in ``[0, 1]`` of ``predictions[i]`` against ``references[i]`` (``rouge-score``).

    Raises:
        DistillError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise DistillError(f"ROUGE-L needs one reference per prediction: got {len(predictions)} predictions and "
                           f"{len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [float(scorer.score(str(ref), str(pred))["rougeL"].fmeasure) for pred, ref in zip(predictions, references)]


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> float:
    """Mean ROUGE-L F1 x 100 over the pairs (module docstring), as the CSD / AdaKD papers report it.

    ``rouge_scorer.RougeScorer(["rougeL"])`` scores each pair; identical non-empty
    strings give 100, strings without a common token 0.

    Raises:
        DistillError: no pairs, or the two lists differ in length.
    """
    scores = rouge_l_scores(predictions, references, use_stemmer=use_stemmer)
    if not scores:
        raise DistillError("ROUGE-L of no examples: pass at least one prediction/reference pair")
    return 100.0 * math.fsum(scores) / len(scores)


# ---------------------------------------------------------------------------
# Held-out data
# ---------------------------------------------------------------------------


def check_instruct_recipe(recipe) -> None:
    """Raise :class:`RecipeError` unless ``recipe`` has instruction data with one tokenizer."""
    data = recipe.data
    if data.kind != "instruct":
        raise RecipeError(f"data.kind={data.kind!r}: generation-based evaluation needs prompt/response data; set "
                          "data.kind: instruct with data.paths (JSON-lines files, or [embedded] for the built-in "
                          "task; docs/data.md)")
    if data.teacher_tokenizer and data.teacher_tokenizer != data.tokenizer:
        raise RecipeError(f"data.teacher_tokenizer={data.teacher_tokenizer!r} differs from data.tokenizer: the KL "
                          "to the teacher on the references needs one vocabulary; evaluate with "
                          "data.teacher_tokenizer=null loss.kd_weight=0 (CE and ROUGE-L of the student alone)")


def held_out_source(recipe, split: str = "valid", *, tokenizer: Optional[Tokenizer] = None) -> InstructSource:
    """The held-out split of ``recipe``'s instruction data (collective for embedded data and tokenizers).

    Raises:
        RecipeError: not instruction data, or ``split`` is not valid/test.
        InputError: the split is empty (the message names ``data.split``).
    """
    check_instruct_recipe(recipe)
    if split not in EVAL_SPLITS:
        raise RecipeError(f"split={split!r}: evaluate on a held-out split, one of {', '.join(EVAL_SPLITS)}")
    return instruct_source(recipe, split, tokenizer=tokenizer)


def _dp_sample_ids(n: int, micro: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This DP rank's microbatches of global sample ids covering ``0 .. n-1`` (ids >= n are padding rows)."""
    per_step = micro * dp_size
    steps = -(-n // per_step)
    return [list(range(k * per_step + dp_rank * micro, k * per_step + (dp_rank + 1) * micro)) for k in range(steps)]


def _eval_batches(source: InstructSource, ids: list[list[int]], n: int) -> list[dict[str, Any]]:
    batches = []
    for sample_ids in ids:
        batch = collate_instruct(source, sample_ids)
        pad = torch.tensor([i >= n for i in sample_ids])
        if bool(pad.any()):
            batch["labels"][pad] = -100
            batch["loss_mask"][pad] = 0.0
        batch.pop("reference_texts")  # the schedule moves tensors only
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------
# Teacher-forced sums
# ---------------------------------------------------------------------------


def _label_logprob(logp: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """``log p(label)`` per row from this rank's shard ``[N, V_local]`` of a log-softmax (summed over TP)."""
    v_local = logp.shape[-1]
    start = vocab_shard_start(v_local, tp_group)
    local = labels - start
    here = (local >= 0) & (local < v_local)
    picked = logp.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1)
    picked = torch.where(here, picked, torch.zeros_like(picked))
    return all_reduce_sum_(picked, tp_group)


class _TeacherForcedLoss:
    """The forward-only schedule's loss function: CE, teacher CE and KL sums over response positions."""

    def __init__(self, *, tp_group, vocab_size: int, teacher: bool):
        self.tp_group, self.vocab_size, self.teacher = tp_group, vocab_size, teacher

    def __call__(self, batch: dict[str, torch.Tensor], output) -> tuple:
        s_logits = output.student_logits
        labels = batch["labels"].to(s_logits.device)
        mask = labels != -100
        y = labels[mask]
        zero = torch.zeros((), dtype=torch.float64, device=s_logits.device)
        report = {k: zero.clone() for k in _SUM_KEYS}
        report["response_tokens"] = torch.tensor(float(y.numel()), dtype=torch.float64, device=s_logits.device)
        student = s_logits[mask]
        teacher = output.teacher_logits[mask] if self.teacher and output.teacher_logits is not None else None
        # fp32 log-softmaxes of a few rows at a time: [rows, V_local] temporaries stay bounded for large vocabularies
        for rows in row_chunks(student.shape[0], student.shape[-1], EVAL_CHUNK_ELEMENTS):
            logq = vocab_parallel_log_softmax(student[rows], self.tp_group, self.vocab_size)
            report["ce_sum"] -= _label_logprob(logq, y[rows], self.tp_group).double().sum()
            if teacher is not None:
                logp = vocab_parallel_log_softmax(teacher[rows], self.tp_group, self.vocab_size)
                report["teacher_ce_sum"] -= _label_logprob(logp, y[rows], self.tp_group).double().sum()
                w = local_real_width(logp.shape[-1], self.tp_group, self.vocab_size)
                kl_local = (logp[:, :w].exp() * (logp[:, :w] - logq[:, :w])).sum(dim=-1)
                report["kl_sum"] += all_reduce_sum_(kl_local, self.tp_group).double().sum()
        return zero.float(), torch.tensor(0, dtype=torch.int), report


@contextlib.contextmanager
def _materialised_logits(stage) -> Iterator[None]:
    """The last stage's output layers compute logits for the block (the fused output layer paused)."""
    fused = bool(getattr(stage, "fused", False))
    stage.fused = False
    try:
        yield
    finally:
        stage.fused = fused


@torch.no_grad()
def _teacher_forced(engine: "Engine", batches: list[dict[str, Any]], *, teacher: bool) -> dict[str, float]:
    tr, recipe = engine.trainer, engine.recipe
    loss_fn = _TeacherForcedLoss(tp_group=engine.ctx.tp_group, vocab_size=engine.vocab_size, teacher=teacher)
    was_training = tr.model.training
    tr.model.eval()
    try:
        with _materialised_logits(tr.stage):
            reports = forward_backward(tr.model, iter(batches), loss_fn, num_microbatches=len(batches),
                                       seq_length=recipe.data.seq_length,
                                       micro_batch_size=recipe.training.micro_batch_size, forward_only=True)
    finally:
        tr.model.train(was_training)
    return reduce_reports(reports, engine.ctx, is_last_stage=tr.is_last_stage, keys=_SUM_KEYS,
                          device=_device(engine))


def _device(engine: "Engine") -> torch.device:
    return next(engine.trainer.stage.student.parameters()).device


# ---------------------------------------------------------------------------
# Greedy answers
# ---------------------------------------------------------------------------


def _prompt_limit(model, max_new_tokens: int) -> Optional[int]:
    """Longest prompt a model with learned positions can continue by ``max_new_tokens`` (None: no limit)."""
    if getattr(model, "position_embedding_type", None) != "learned_absolute":
        return None
    limit = int(model.max_sequence_length) - max_new_tokens
    if limit < 1:
        raise DistillError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the student's "
                           f"max_position_embeddings={model.max_sequence_length} (learned positions); lower it")
    return limit


def _answers(engine: "Engine", source: InstructSource, rows: list[int], tokenizer: Tokenizer, *,
             max_new_tokens: int, batch_size: int, show_progress: bool) -> tuple[list[list[int]], list[bool], float]:
    """Greedy answers (ids without the EOS) to examples ``rows`` of ``source``, whether each hit EOS, seconds."""
    student = engine.trainer.stage.student
    gpt = student
    while not hasattr(gpt, "decoder") and hasattr(gpt, "module"):
        gpt = gpt.module
    limit = _prompt_limit(gpt, max_new_tokens)
    eos = tokenizer.eos_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos)
    prompts_all = [list(map(int, source.prompts[k])) for k in rows]
    if limit is not None:
        prompts_all = [p[-limit:] for p in prompts_all]
    # batches of similar prompt lengths: generate() steps one token at a time from the shortest prompt of a batch
    order = sorted(range(len(rows)), key=lambda j: len(prompts_all[j]))
    answers: list[list[int]] = [[] for _ in rows]
    stopped: list[bool] = [False for _ in rows]
    start = time.perf_counter()
    with Progress("generating answers", total=len(rows), unit="answers", enabled=show_progress) as bar:
        for lo in range(0, len(rows), batch_size):
            chunk = order[lo:lo + batch_size]
            prompts = [prompts_all[j] for j in chunk]
            seen = [0]

            def on_step(p: GenerationProgress, seen=seen) -> None:
                if p.rows_done > seen[0]:
                    bar.update(p.rows_done - seen[0])
                    seen[0] = p.rows_done

            result = generate(student, prompts, config, context=engine.ctx, vocab_size=engine.vocab_size,
                              progress=on_step)
            if len(chunk) > seen[0]:
                bar.update(len(chunk) - seen[0])
            for j, row, hit in zip(chunk, result.responses(), result.finished.tolist()):
                answers[j] = row[:-1] if hit and row and row[-1] == eos else row
                stopped[j] = bool(hit)
    return answers, stopped, time.perf_counter() - start


# ---------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------


@dataclass
class InstructEvaluation:
    """What :func:`evaluate_instruct` returns (identical on every rank).

    Attributes:
        metrics: ``eval_response_ce``, ``eval_teacher_response_ce`` and ``eval_kl``
            (nats/token, None without a teacher), ``eval_rouge_l`` (x100, None when
            not generated), ``eval_examples``, ``eval_response_tokens``,
            ``eval_answer_tokens`` (mean generated tokens, EOS included),
            ``eval_eos_fraction`` (answers that ended with EOS), ``eval_generate_s``.
        split: the held-out split scored.
        max_new_tokens: the answer length limit.
        examples: per example ``{"example", "prompt", "reference", "answer", "rouge_l"}``
            (split order; only when asked for with ``keep_examples``).
    """

    metrics: dict[str, Optional[float]]
    split: str
    max_new_tokens: int
    examples: list[dict] = field(default_factory=list)


def evaluate_instruct(engine: "Engine", *, source: Optional[InstructSource] = None, split: str = "valid",
                      num_examples: Optional[int] = None, max_new_tokens: int = 64, generate_answers: bool = True,
                      generation_batch_size: int = 16, keep_examples: bool = False,
                      show_progress: Optional[bool] = None, tokenizer: Optional[Tokenizer] = None
                      ) -> InstructEvaluation:
    """Response CE, KL(teacher || student) and ROUGE-L of greedy answers on a held-out instruction split.

    Collective: call on every rank of the engine's world with the same arguments.

    Args:
        engine: a built engine; its student (and teacher, when the recipe builds one) is scored as it is.
        source: the held-out split (default: :func:`held_out_source` of ``split``, built here).
        split: ``valid`` or ``test`` (when ``source`` is None).
        num_examples: score the first ``num_examples`` examples of the split's order (None: all).
        max_new_tokens: answer length limit (greedy decoding, stops at EOS).
        generate_answers: False scores CE/KL only (``eval_rouge_l`` is None).
        generation_batch_size: prompts per :func:`generate` call on each DP rank.
        keep_examples: gather every example's prompt, reference, answer and F1 into ``examples``.
        show_progress: the progress line of the answers (default: global rank 0).
        tokenizer: decodes answers (default: the recipe's, :func:`instruct_tokenizer`).

    Raises:
        RecipeError: not instruction data, or two tokenizers.
        DistillError: ``num_examples`` < 1, or the split has no response token to score.
    """
    recipe, ctx = engine.recipe, engine.ctx
    check_instruct_recipe(recipe)
    if engine.trainer.teacher_provider is not None:
        raise RecipeError("generation-based evaluation needs the teacher on the student's ranks; with "
                          "teacher_parallel score the run's checkpoints with distill eval (it co-locates the teacher)")
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
        raise DistillError(f"num_examples={num_examples!r}: expected an integer >= 1 (or None for the whole split)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DistillError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not isinstance(generation_batch_size, int) or generation_batch_size < 1:
        raise DistillError(f"generation_batch_size={generation_batch_size!r}: expected an integer >= 1")
    if tokenizer is None:
        tokenizer = rank0_first(lambda: instruct_tokenizer(recipe))
    if source is None:
        source = held_out_source(recipe, split, tokenizer=tokenizer)
    n = source.num_samples if num_examples is None else min(num_examples, source.num_samples)
    rank0 = dist.get_rank() == 0 if dist.is_initialized() else True
    show = rank0 if show_progress is None else show_progress
    teacher = engine.trainer.stage.teacher is not None and engine.teacher_vocab_size == engine.vocab_size

    ids = _dp_sample_ids(n, recipe.training.micro_batch_size, ctx.dp_rank, ctx.dp_size)
    sums = _teacher_forced(engine, _eval_batches(source, ids, n), teacher=teacher)
    count = sums["response_tokens"]
    if count <= 0:
        raise DistillError(f"{source.description} ({source.split}): the {n} examples scored have no response token "
                           "(every response truncated away?); raise data.seq_length or use more examples")
    metrics: dict[str, Optional[float]] = {
        "eval_response_ce": sums["ce_sum"] / count,
        "eval_teacher_response_ce": sums["teacher_ce_sum"] / count if teacher else None,
        "eval_kl": sums["kl_sum"] / count if teacher else None,
        "eval_rouge_l": None,
        "eval_examples": float(n),
        "eval_response_tokens": count,
    }
    records: list[dict] = []
    if generate_answers:
        mine = [i for batch in ids for i in batch if i < n]  # this DP rank's samples, in order
        rows = [source.example_index(i) for i in mine]
        answers, stopped, seconds = _answers(engine, source, rows, tokenizer, max_new_tokens=max_new_tokens,
                                             batch_size=generation_batch_size, show_progress=show)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        refs = [source.references[k] for k in rows]
        f1 = rouge_l_scores(texts, refs)
        lengths = [len(a) + int(s) for a, s in zip(answers, stopped)]
        vec = torch.tensor([math.fsum(f1), float(len(f1)), float(sum(lengths)), float(sum(stopped)), seconds],
                           dtype=torch.float64, device=_device(engine))
        if group_size(ctx.dp_group) > 1:
            seconds_max = vec[4:].clone()
            dist.all_reduce(vec, group=ctx.dp_group)
            dist.all_reduce(seconds_max, op=dist.ReduceOp.MAX, group=ctx.dp_group)
            vec[4] = seconds_max[0]
        total, answered, tokens, eos_hits, wall = vec.tolist()
        metrics.update(eval_rouge_l=100.0 * total / answered, eval_answer_tokens=tokens / answered,
                       eval_eos_fraction=eos_hits / answered, eval_generate_s=wall)
        if keep_examples:
            local = [{"sample": i, "example": k, "prompt": tokenizer.decode(list(map(int, source.prompts[k]))),
                      "reference": r, "answer": t, "rouge_l": 100.0 * f}
                     for i, k, r, t, f in zip(mine, rows, refs, texts, f1)]
            if group_size(ctx.dp_group) > 1:
                gathered: list = [None] * group_size(ctx.dp_group)
                dist.all_gather_object(gathered, local, group=ctx.dp_group)
                local = [rec for part in gathered for rec in part]
            records = [{k: v for k, v in rec.items() if k != "sample"} for rec in sorted(local, key=lambda r: r["sample"])]
        if rank0:
            log.info("generated %d answers (greedy, max_new_tokens=%d) in %.1fs: ROUGE-L %.2f, %.1f tokens per "
                     "answer, %.0f%% ended with EOS", int(answered), max_new_tokens, wall, metrics["eval_rouge_l"],
                     metrics["eval_answer_tokens"], 100.0 * metrics["eval_eos_fraction"])
    return InstructEvaluation(metrics=metrics, split=source.split, max_new_tokens=max_new_tokens, examples=records)
