"""Resumable microbatch iterators for the training engine.

Batch layout (every microbatch is a dict of CPU tensors, ``b`` = micro batch
size, ``s`` = ``data.seq_length``):

=============== =========== ===============================================
key             shape/dtype meaning
=============== =========== ===============================================
``tokens``      [b, s] i64  input ids
``labels``      [b, s] i64  **next-token targets, already shifted**:
                            ``labels[:, i] == tokens[:, i + 1]`` inside a
                            window (and the window's extra last token at
                            ``i = s - 1``). Pair ``logits[:, i]`` with
                            ``labels[:, i]``; do not shift again.
``loss_mask``   [b, s] f32  1.0 where the label counts, 0.0 on padding
``position_ids``[b, s] i64  ``0 .. s-1`` on every row
``sample_ids``  [b]    i64  global sample index of each row (debugging, tests)
=============== =========== ===============================================

Label convention: this is the MiniLLM/megatron one (methods.md section 0):
the data loader pre-shifts, the loss never does. An HF-style loss that does
``logits[:, :-1]`` vs ``labels[:, 1:]`` on these batches is off by one.

Order and resumption: the data stream is a sequence of global samples
``0, 1, 2, ...`` of a source (:mod:`distill_plugins.data.sources`), a pure
function of the recipe seed. Microbatch ``k`` of the run covers the global
samples ``[c, c + b * dp_size)`` with ``c`` the consumed count before it;
data-parallel rank ``r`` takes ``[c + r*b, c + (r+1)*b)`` (megatron's
pretraining sampler). After each microbatch every rank adds ``b * dp_size`` to
``consumed_samples``, so after ``n`` optimizer steps it is
``n * global_batch_size`` on every rank, and a run resumed with
``consumed_samples=n * global_batch_size`` draws exactly the batches the
uninterrupted run would have drawn, for any data-parallel size that divides
the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import InputError
from ..logging import get_logger
from .embedded import DEFAULT_VOCAB_SIZE, build_embedded
from .instruct import build_instruct_data, build_instruct_eval_data
from .sources import SPLIT_CODES, SyntheticSource, jsonl_source, megatron_sources
# the iterator base and the rank-0-first helper live in .stream (no cycle with .instruct); the names
from .stream import ConsumedSamplesIterator, dist_if_initialized, rank0_first
from .tokenizer import Tokenizer, load_tokenizer

log = get_logger(__name__)


class MicrobatchIterator(ConsumedSamplesIterator):
    """Infinite (or bounded) iterator of one DP rank's token microbatches; resumable by consumed samples.

    Args:
        source: a sample source (``sample(i) -> (text[s+1], loss_mask[s])``).
        micro_batch_size: rows per microbatch on this rank.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        consumed_samples: global samples already consumed (by all DP ranks together).
        max_microbatches: stop after this many microbatches (None: never stop).
    """

    def __init__(self, source, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, max_microbatches: Optional[int] = None, kind: str = "", split: str = "train"):
        super().__init__(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, max_microbatches=max_microbatches, kind=kind, split=split,
                         seq_length=source.seq_length)
        self.source = source

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self._next_first()
        ids = list(range(first, first + self.micro_batch_size))
        texts, masks = zip(*(self.source.sample(i) for i in ids))
        text = torch.from_numpy(np.stack(texts))
        batch = {
            "tokens": text[:, :-1].contiguous(),
            "labels": text[:, 1:].contiguous(),
            "loss_mask": torch.from_numpy(np.stack(masks)).float(),
            "position_ids": self._positions.clone(),
            "sample_ids": torch.tensor(ids, dtype=torch.int64),
        }
        self._advance()
        return batch


# ---------------------------------------------------------------------------
# Recipe -> sources
# ---------------------------------------------------------------------------


def resolve_tokenizer(recipe, which: str = "student") -> Optional[Tokenizer]:
    """The tokenizer a recipe's data uses for ``which`` model (``student`` or ``teacher``), or None.

    ``data.teacher_tokenizer`` defaults to ``data.tokenizer``; for
    ``data.kind: embedded`` the default is ``embedded:4096``. The engine can
    take ``vocab_size`` from here when the model spec leaves it null.
    """
    data = recipe.data
    spec = data.tokenizer
    if which == "teacher" and data.teacher_tokenizer:
        spec = data.teacher_tokenizer
    if spec is None and (data.kind == "embedded" or (data.kind == "instruct" and list(data.paths) == ["embedded"])):
        spec = f"embedded:{DEFAULT_VOCAB_SIZE}"  # the embedded corpus and the embedded instruction task
    return load_tokenizer(spec) if spec else None


def _synthetic_vocab(recipe) -> int:
    sizes = [m.vocab_size for m in (recipe.student, recipe.teacher) if m.vocab_size]
    if sizes:
        return min(sizes)
    tok = resolve_tokenizer(recipe)
    if tok is not None:
        return tok.vocab_size
    raise InputError("data.kind=synthetic needs a vocabulary size: set student.vocab_size (or data.tokenizer)")


def build_sources(recipe, *, dp_size: int, splits=("train", "valid", "test"), progress: Optional[bool] = None) -> dict:
    """Sample sources for the requested splits of ``recipe.data`` (None for a split with no data).

    Collective for ``indexed`` and ``embedded`` data when torch.distributed is
    initialised (megatron's dataset builder synchronises the world): call it
    on every rank.
    """
    data, training, seed = recipe.data, recipe.training, recipe.seed
    dist = dist_if_initialized()
    rank = dist.get_rank() if dist else 0
    progress = (rank == 0) if progress is None else progress
    if data.kind == "synthetic":
        vocab = _synthetic_vocab(recipe)
        return {s: SyntheticSource(vocab, data.seq_length, seed, s) for s in splits}
    if data.kind == "jsonl":
        if not data.paths:
            raise InputError("data.kind=jsonl needs data.paths (JSONL files or globs)")
        tok = resolve_tokenizer(recipe)
        if tok is None:
            raise InputError("data.kind=jsonl needs data.tokenizer (a tokenizers JSON file, HF directory or embedded:N)")
        return {s: jsonl_source(data.paths, tok, seq_length=data.seq_length, seed=seed, split=s,
                                split_spec=data.split, text_key=data.text_key) for s in splits}
    eval_size = training.eval_batches * training.micro_batch_size * dp_size
    if data.kind == "embedded":
        spec = data.tokenizer or f"embedded:{DEFAULT_VOCAB_SIZE}"
        if str(spec).startswith("embedded:"):
            vocab = int(str(spec).split(":", 1)[1]) if str(spec)[9:].isdigit() else None
            if vocab is None:
                load_tokenizer(spec)  # raises the helpful message
            built = rank0_first(lambda: build_embedded(vocab, progress=progress))
            tok = built.tokenizer()
            tok.name = spec
        else:
            tok = load_tokenizer(spec)
            built = rank0_first(lambda: build_embedded(tokenizer=tok, progress=progress))
        blends = [([built.prefixes[s]], None) for s in ("train", "valid", "test")]
        sources = megatron_sources(blend_per_split=blends, sizes=[None, None, None], seq_length=data.seq_length,
                                   seed=seed, tokenizer=tok, cache_path=str(built.corpus.directory / "gpt_index_cache"))
    elif data.kind == "indexed":
        if not data.paths:
            raise InputError("data.kind=indexed needs data.paths (indexed dataset prefixes, without .bin/.idx)")
        tok = resolve_tokenizer(recipe)
        weighted = data.weights is not None and len(data.paths) > 1
        train_size = training.steps * training.global_batch_size if weighted else None
        sizes = [train_size, eval_size if weighted else None, eval_size if weighted else None]
        sources = megatron_sources(blend=(list(data.paths), list(data.weights) if weighted else None),
                                   split_spec=data.split, sizes=sizes, seq_length=data.seq_length, seed=seed,
                                   tokenizer=tok, cache_path=str(Path(recipe.output_dir) / "data_cache"))
    elif data.kind == "instruct":
        raise InputError("data.kind=instruct has no token-stream sources; its batches come from build_data "
                         "(distill_plugins.data.instruct)")
    else:  # the schema's Literal makes this unreachable from a recipe
        raise InputError(f"data.kind={data.kind!r} is not one of synthetic, jsonl, indexed, embedded, instruct")
    return {s: sources.get(s) for s in splits}


def build_data(recipe, *, dp_rank: int, dp_size: int, consumed_samples: int = 0,
               split: str = "train") -> MicrobatchIterator:
    """The training iterator of this DP rank: an endless stream of microbatches (see module docstring).

    Args:
        recipe: a :class:`distill_plugins.recipe.schema.Recipe`; uses ``data``,
            ``training.micro_batch_size`` (and ``steps``/``global_batch_size``
            for weighted blends), ``seed`` and ``output_dir`` (index cache).
        dp_rank, dp_size: data-parallel coordinates of this rank (TP/PP peers
            pass the same values and get the same batches).
        consumed_samples: global samples consumed so far (from the checkpoint's
            data state; ``step * global_batch_size``).
        split: ``train`` (default), ``valid`` or ``test``.

    Collective for indexed/embedded data (every rank must call it).
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split={split!r} is not one of train, valid, test")
    if recipe.data.kind == "instruct":
        return build_instruct_data(recipe, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples,
                                   split=split)
    source = _split_source(recipe, dp_size, split, "")
    return MicrobatchIterator(source, micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank,
                              dp_size=dp_size, consumed_samples=consumed_samples, kind=recipe.data.kind, split=split)


def _split_source(recipe, dp_size: int, split: str, purpose: str):
    """The source of one split; InputError when ``data.split`` gives it no documents (``purpose`` says what for)."""
    source = build_sources(recipe, dp_size=dp_size, splits=(split,))[split]
    if source is None:
        raise InputError(f"data has no {split} split{purpose} (data.split={recipe.data.split!r})")
    return source


class EvalData:
    """A re-iterable held-out set: each ``iter()`` yields the same ``num_microbatches`` microbatches from sample 0."""

    def __init__(self, source, *, micro_batch_size: int, dp_rank: int, dp_size: int, num_microbatches: int,
                 kind: str, split: str):
        self.source, self.num_microbatches = source, num_microbatches
        self._kw = dict(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, kind=kind, split=split)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return MicrobatchIterator(self.source, consumed_samples=0, max_microbatches=self.num_microbatches, **self._kw)

    def __len__(self) -> int:
        return self.num_microbatches


def build_eval_data(recipe, *, dp_rank: int, dp_size: int, split: str = "valid",
                    num_microbatches: Optional[int] = None) -> EvalData:
    """The held-out microbatches of this DP rank (``training.eval_batches`` per evaluation by default).

    Every evaluation sees the same samples (the first ``num_microbatches *
    micro_batch_size * dp_size`` of the split), so evaluations are comparable
    across steps and runs. Collective like :func:`build_data`.
    """
    if recipe.data.kind == "instruct":
        return build_instruct_eval_data(recipe, dp_rank=dp_rank, dp_size=dp_size, split=split,
                                        num_microbatches=num_microbatches)
    source = _split_source(recipe, dp_size, split, " for evaluation")
    n = num_microbatches if num_microbatches is not None else recipe.training.eval_batches
    return EvalData(source, micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                    num_microbatches=n, kind=recipe.data.kind, split=split)
