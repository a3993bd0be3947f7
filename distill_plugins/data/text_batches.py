"""Resumable microbatches of raw text for cross-tokenizer aligners (eta, dskd, uld).

Design
------
A cross-tokenizer aligner pairs positions of two tokenizations of the same
text, so its batches are built from text, not from token ids: sample ``i`` of
a split is a string (:class:`PackedTextSource`), and
:class:`~distill_plugins.data.alignment_collate.AlignmentCollator` encodes
each microbatch with both tokenizers and aligns them.

Packing (as the token-id path, :class:`~distill_plugins.data.sources.PackedSource`):
the split's non-blank documents, in corpus order, form one text stream
``d_0 + "\\n\\n" + d_1 + "\\n\\n" + ...``, tokenized once with the student
tokenizer (each document with the separator before it, which is how the
byte-level pre-tokenizer splits the joined text). Window ``k`` is the student
tokens ``[k*s, k*s + s + 1)`` of the stream (``s = data.seq_length``; windows
share their boundary token), ``W = max(1, T // s)`` windows for ``T`` stream
tokens, so consecutive windows walk every document from its beginning to its
end and across into the next; only the last ``< s`` tokens of the split are
left out, as on the token-id path. Sample ``i`` of epoch ``e, j = divmod(i, W)``
is window ``default_rng([seed, SPLIT_CODES[split], e]).permutation(W)[j]``; its
text runs from the window's first token to a few tokens past its end (the
collator re-tokenizes it and keeps ``s + 1`` student tokens), or to the end of
the stream for the window that reaches it (the collator then appends EOS).

Order and resumption follow :mod:`distill_plugins.data.iterators`: sample
``i`` is a pure function of ``(seed, split, i)``; microbatch ``k`` of DP rank
``r`` covers global samples ``[c + r*b, c + (r+1)*b)`` with ``c`` the consumed
count, and every rank adds ``b * dp_size`` after each microbatch.

Batch: every :class:`AlignmentCollator` key (``student_*``, ``teacher_*``,
``align_teacher_pos``, ``aligned_mask``, ``num_student_targets``,
``num_aligned``) plus the keys of :class:`~distill_plugins.data.iterators.MicrobatchIterator`
with the same meaning (``b`` rows, ``s = data.seq_length``)::

    tokens        int64 [b, s]  = student_tokens
    labels        int64 [b, s]  = student_labels (pre-shifted next tokens, -100 on padding)
    loss_mask     f32   [b, s]  = labels != -100
    position_ids  int64 [b, s]  0 .. s-1
    sample_ids    int64 [b]     global sample index of each row

Usage::

    train = build_aligned_data(recipe, dp_rank=r, dp_size=dp, pairing="eta", consumed_samples=c)
    batch = next(train)
    held_out = build_aligned_eval_data(recipe, dp_rank=r, dp_size=dp)
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from .alignment_collate import AlignmentCollator
from .instruct_aligned import build_instruct_aligned_data, build_instruct_aligned_eval_data
from .iterators import resolve_tokenizer
from .sources import SPLIT_CODES, expand_inputs, iter_texts, split_ranges
from .stream import PrefetchingIterator, rank0_first

__all__ = ["text_documents", "PackedTextSource", "AlignedMicrobatchIterator", "AlignedEvalData",
           "build_aligned_data", "build_aligned_eval_data"]

#: Separator placed between packed documents.
DOCUMENT_SEPARATOR = "\n\n"


def _check_split(split: str) -> None:
    if split not in SPLIT_CODES:
        raise ValueError(f"split={split!r} is not one of train, valid, test")


def text_documents(recipe, split: str) -> list[str]:
    """The raw documents of one split of ``recipe.data`` (``jsonl`` or ``embedded``), in corpus order.

    ``jsonl`` splits by :func:`~distill_plugins.data.sources.split_ranges`
    exactly as :func:`~distill_plugins.data.sources.jsonl_source` does, so the
    token-id and text paths see the same documents per split. ``embedded``
    reads the cached corpus (built by global rank 0 first; collective when
    torch.distributed is initialised).

    Raises:
        InputError: another ``data.kind``, no ``data.paths``, or an empty split.
    """
    _check_split(split)
    data = recipe.data
    if data.kind == "jsonl":
        if not data.paths:
            raise InputError("data.kind=jsonl needs data.paths (JSONL files or globs)")
        files = expand_inputs(data.paths)
        texts = [t for f in files for t in iter_texts(f, data.text_key)]
        lo, hi = split_ranges(len(texts), data.split)[split]
        docs = texts[lo:hi]
        where = f"data.split={data.split!r} over {len(texts)} documents in {', '.join(files)}"
    elif data.kind == "embedded":
        from .embedded_corpus import build_embedded_corpus  # local: keeps this module's import light

        corpus = rank0_first(build_embedded_corpus)
        docs = list(corpus.texts(split))
        where = f"the embedded corpus at {corpus.directory} (data.split={data.split!r} does not apply to it)"
    else:
        raise InputError(f"data.kind={data.kind!r}: cross-tokenizer aligners need raw text; set data.kind to "
                         "jsonl or embedded (the token-id kinds synthetic and indexed cannot be re-tokenized)")
    if not docs:
        raise InputError(f"the {split} split is empty: {where}; give that split a larger share or more documents")
    return docs


#: student tokens of text kept past a window's end, so re-tokenizing its text reproduces its last tokens
LOOKAHEAD_TOKENS = 8


class PackedTextSource:
    """Sample ``i`` -> the text of one window of ``seq_length`` student tokens (see the module docstring).

    Args:
        documents: the split's documents in corpus order; blank ones are dropped.
        seed: the recipe seed.
        split: ``train``, ``valid`` or ``test`` (part of the shuffle seed).
        tokenizer: the student's ``tokenizers.Tokenizer`` with untrimmed offsets
            (``AlignmentCollator(...).student.backend``), which the collator re-tokenizes with.
        seq_length: student tokens per window (``data.seq_length``).

    Attributes:
        text: the split's text stream; ``token_starts`` / ``token_ends`` int64
            ``[T]``: character span of each stream token.
        num_windows: ``W = max(1, T // seq_length)``, the samples of one epoch.
    """

    def __init__(self, documents: Sequence[str], *, seed: int, split: str, tokenizer: Any, seq_length: int):
        _check_split(split)
        if seq_length <= 0:
            raise ValueError(f"seq_length={seq_length} must be > 0")
        self.documents = [d for d in documents if d and not d.isspace()]
        if not self.documents:
            raise InputError(f"the {split} split has no non-blank documents ({len(documents)} given)")
        self.seed, self.split, self.seq_length = int(seed), split, int(seq_length)
        self.split_code = SPLIT_CODES[split]
        self.num_documents = len(self.documents)
        pieces = self.documents[:1] + [DOCUMENT_SEPARATOR + d for d in self.documents[1:]]
        self.text = "".join(pieces)
        starts, ends, base = [], [], 0
        for piece, enc in zip(pieces, tokenizer.encode_batch(pieces, add_special_tokens=False)):
            off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            starts.append(off[:, 0] + base)
            ends.append(off[:, 1] + base)
            base += len(piece)
        self.token_starts, self.token_ends = np.concatenate(starts), np.concatenate(ends)
        self.num_tokens = int(self.token_starts.size)
        if self.num_tokens == 0:
            raise InputError(f"the {split} split's {self.num_documents} documents give no student tokens")
        self.num_windows = max(1, self.num_tokens // self.seq_length)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``: ``default_rng([seed, split_code, epoch]).permutation(W)``."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.split_code, int(epoch)])
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order

    def window(self, k: int) -> str:
        """The text of window ``k``: from its first token to ``LOOKAHEAD_TOKENS`` tokens past its end."""
        first = int(k) * self.seq_length
        last = first + self.seq_length + LOOKAHEAD_TOKENS
        start = int(self.token_starts[first])
        if last >= self.num_tokens - 1:
            return self.text[start:]  # reaches the stream's end: the collator appends EOS when it fits
        return self.text[start:int(self.token_ends[last])]

    def sample(self, index: int) -> str:
        """The text of global sample ``index`` (>= 0)."""
        if index < 0:
            raise ValueError(f"sample index {index} must be >= 0")
        epoch, j = divmod(int(index), self.num_windows)
        return self.window(int(self.order(epoch)[j]))


class AlignedMicrobatchIterator(PrefetchingIterator):
    """One DP rank's microbatches of aligned text; resumable by consumed samples like ``MicrobatchIterator``.

    Args:
        source: a :class:`PackedTextSource` (``sample(i) -> str``).
        collator: the :class:`AlignmentCollator` building each batch.
        micro_batch_size: rows per microbatch on this rank.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        consumed_samples: global samples already consumed (by all DP ranks together).
        max_microbatches: stop after this many microbatches (None: never stop).
        kind, split: recorded in :meth:`state_dict`; ``kind`` is checked on load.
        prefetch: build the next microbatch in a background thread while the
            current one trains (tokenization releases the GIL). Batches are a
            pure function of their sample indices, so prefetching changes no
            value and resumption stays exact.
    """

    stream = "text"

    def __init__(self, source: PackedTextSource, collator: AlignmentCollator, *, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0, max_microbatches: Optional[int] = None,
                 kind: str = "", split: str = "train", prefetch: bool = True):
        super().__init__(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, max_microbatches=max_microbatches, kind=kind, split=split,
                         seq_length=collator.student.seq_length, prefetch=prefetch)
        self.source, self.collator = source, collator

    def _build(self, first: int) -> dict[str, torch.Tensor]:
        """The microbatch of global samples ``first .. first + micro_batch_size - 1``."""
        ids = list(range(first, first + self.micro_batch_size))
        batch = self.collator([self.source.sample(i) for i in ids])
        labels = batch["student_labels"]
        batch.update(tokens=batch["student_tokens"], labels=labels, loss_mask=(labels != -100).float(),
                     position_ids=self._positions.clone(), sample_ids=torch.tensor(ids, dtype=torch.int64))
        return batch


class AlignedEvalData:
    """A re-iterable held-out set: each ``iter()`` yields the same ``num_microbatches`` microbatches from sample 0."""

    def __init__(self, source: PackedTextSource, collator: AlignmentCollator, *, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_microbatches: int, kind: str, split: str):
        self.source, self.collator, self.num_microbatches = source, collator, num_microbatches
        self._kw = dict(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, kind=kind, split=split)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return AlignedMicrobatchIterator(self.source, self.collator, consumed_samples=0,
                                         max_microbatches=self.num_microbatches, **self._kw)

    def __len__(self) -> int:
        return self.num_microbatches


# ---------------------------------------------------------------------------
# Recipe -> iterators
# ---------------------------------------------------------------------------


def _tokenizer(recipe, which: str):
    data = recipe.data
    key = "data.teacher_tokenizer" if which == "teacher" and data.teacher_tokenizer else "data.tokenizer"
    try:
        tok = resolve_tokenizer(recipe, which)
    except InputError as exc:
        raise InputError(f"{key}: {exc}") from exc
    if tok is None:
        keys = "data.tokenizer (and data.teacher_tokenizer when the teacher's differs)"
        raise InputError(f"cross-tokenizer aligners need the {which}'s tokenizer: set {keys} to a tokenizers "
                         "JSON file, a Hugging Face tokenizer directory or embedded:N")
    return tok


def load_tokenizer_pair(recipe) -> tuple:
    """``(student, teacher)`` tokenizers of ``recipe.data`` (one object when the specs agree).

    Collective for ``embedded`` data or ``embedded:N`` specs, which are trained
    and cached on first use: rank 0 first, the others read its files.

    Raises:
        InputError: a tokenizer is missing or cannot be loaded (naming the key).
    """
    data = recipe.data

    def load():
        student = _tokenizer(recipe, "student")
        same = data.teacher_tokenizer in (None, data.tokenizer)
        return student, student if same else _tokenizer(recipe, "teacher")

    specs = [data.tokenizer, data.teacher_tokenizer]
    cached = data.kind == "embedded" or any(str(s).startswith("embedded:") for s in specs if s)
    return rank0_first(load) if cached else load()


def _parts(recipe, split: str, pairing: str) -> tuple[PackedTextSource, AlignmentCollator]:
    data = recipe.data
    documents = text_documents(recipe, split)  # first: a wrong data.kind is the likelier mistake
    student, teacher = load_tokenizer_pair(recipe)
    collator = AlignmentCollator(student, teacher, seq_length=data.seq_length, teacher_seq_length=data.seq_length,
                                 pairing=pairing)
    source = PackedTextSource(documents, seed=recipe.seed, split=split, tokenizer=collator.student.backend,
                              seq_length=data.seq_length)
    return source, collator


def build_aligned_data(recipe, *, dp_rank: int, dp_size: int, pairing: str = "eta", consumed_samples: int = 0,
                       split: str = "train") -> AlignedMicrobatchIterator:
    """The cross-tokenizer training iterator of this DP rank: an endless stream of aligned microbatches.

    Args:
        recipe: a :class:`~distill_plugins.recipe.schema.Recipe`; uses ``data``
            (kind jsonl or embedded, tokenizer, teacher_tokenizer, seq_length
            for both models), ``training.micro_batch_size`` and ``seed``.
        dp_rank, dp_size: data-parallel coordinates (TP/PP peers pass the same values).
        pairing: ``"eta"`` (exact token alignment: eta, dskd) or ``"position"`` (uld).
        consumed_samples: global samples consumed so far (``step * global_batch_size``).
        split: ``train`` (default), ``valid`` or ``test``.

    Collective for embedded data or ``embedded:N`` tokenizers when
    torch.distributed is initialised (every rank must call it). ``data.kind:
    instruct`` dispatches to :mod:`distill_plugins.data.instruct_aligned`.
    """
    if recipe.data.kind == "instruct":
        return build_instruct_aligned_data(recipe, tokenizers=load_tokenizer_pair(recipe), dp_rank=dp_rank,
                                           dp_size=dp_size, pairing=pairing, consumed_samples=consumed_samples,
                                           split=split)
    source, collator = _parts(recipe, split, pairing)
    return AlignedMicrobatchIterator(source, collator, micro_batch_size=recipe.training.micro_batch_size,
                                     dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples,
                                     kind=recipe.data.kind, split=split)


def build_aligned_eval_data(recipe, *, dp_rank: int, dp_size: int, pairing: str = "eta", split: str = "valid",
                            num_microbatches: Optional[int] = None) -> AlignedEvalData:
    """The held-out aligned microbatches of this DP rank (``training.eval_batches`` by default).

    Every evaluation sees the first ``num_microbatches * micro_batch_size *
    dp_size`` samples of the split. Collective like :func:`build_aligned_data`.
    """
    if recipe.data.kind == "instruct":
        return build_instruct_aligned_eval_data(recipe, tokenizers=load_tokenizer_pair(recipe), dp_rank=dp_rank,
                                                dp_size=dp_size, pairing=pairing, split=split,
                                                num_microbatches=num_microbatches)
    source, collator = _parts(recipe, split, pairing)
    n = num_microbatches if num_microbatches is not None else recipe.training.eval_batches
    if n < 0:
        raise ValueError(f"num_microbatches={n} must be >= 0")
    return AlignedEvalData(source, collator, micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank,
                           dp_size=dp_size, num_microbatches=n, kind=recipe.data.kind, split=split)
