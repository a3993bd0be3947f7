"""Sample sources: map a global sample index to one training sequence.

A source answers ``source.sample(i) -> (text, loss_mask)`` for any
``i >= 0``, where ``text`` is ``seq_length + 1`` token ids (int64) and
``loss_mask`` is ``seq_length`` floats. ``tokens = text[:-1]`` and
``labels = text[1:]`` (next token, pre-shifted). Indices past one epoch wrap
into the next epoch; every source is a pure function of ``(seed, i)``, which
is what makes the iterators in :mod:`distill_plugins.data.iterators` resume
exactly from a count of consumed samples.

Sources:

* :class:`SyntheticSource`: uniform random tokens from ``(seed, i)``; for smoke tests.
* :class:`PackedSource`: documents tokenized in memory (JSONL), each followed
  by EOS, concatenated and cut into non-overlapping windows of ``seq_length``
  (+1 for the last label); window order is a fresh permutation per epoch.
* :class:`MegatronSource`: a megatron-core ``GPTDataset`` or ``BlendedDataset``
  built by ``BlendedMegatronDatasetBuilder`` (indexed and embedded data).
  Its shuffle is megatron's own, from the recipe seed; indices beyond the
  samples it was built for wrap into reshuffled epochs.
"""

from __future__ import annotations

import contextlib
import glob
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch.distributed as dist

from ..errors import InputError
from .tokenizer import Tokenizer

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
#: file suffixes read as JSON lines (one record per line)
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")


class SyntheticSource:
    """Uniform random token ids in ``[0, vocab_size)``; sample ``i`` depends only on ``(seed, split, i)``."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: str = "train"):
        self.vocab_size, self.seq_length, self.seed = int(vocab_size), int(seq_length), int(seed)
        self.split_code = SPLIT_CODES[split]
        self.num_samples = None  # unbounded
        self.description = f"synthetic(vocab={vocab_size}, seq={seq_length}, seed={seed}, split={split})"

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_code, int(index)])
        text = rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
        return text, np.ones(self.seq_length, dtype=np.float32)


class PackedSource:
    """Windows of ``seq_length + 1`` tokens over one concatenated token stream.

    Window ``k`` covers ``stream[k*s : k*s + s + 1]`` (windows share their
    boundary token, as megatron's GPTDataset samples do). Epoch ``e`` visits
    the windows in the order ``default_rng([seed, split, e]).permutation(N)``.
    """

    def __init__(self, stream: np.ndarray, seq_length: int, seed: int, split: str = "train", description: str = ""):
        self.stream = np.asarray(stream, dtype=np.int64)
        self.seq_length, self.seed = int(seq_length), int(seed)
        self.split_code = SPLIT_CODES[split]
        self.num_samples = (len(self.stream) - 1) // self.seq_length
        if self.num_samples < 1:
            raise InputError(f"{description or 'data'} ({split}): {len(self.stream)} tokens are fewer than one "
                             f"sequence of seq_length+1={self.seq_length + 1}; use more text or a shorter data.seq_length")
        self.description = description
        self._epoch, self._perm = -1, None

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, j = divmod(int(index), self.num_samples)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.split_code, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        k = int(self._perm[j]) * self.seq_length
        return self.stream[k:k + self.seq_length + 1].copy(), np.ones(self.seq_length, dtype=np.float32)


class MegatronSource:
    """A megatron-core GPT/Blended dataset seen through the source interface.

    Megatron shuffles the samples it was built for (epoch 0 here). Indices past
    them wrap into further epochs, each visiting the same samples in a fresh
    order ``default_rng([seed, split, epoch]).permutation(N)``, so the stream
    does not depend on how many samples were built.
    """

    def __init__(self, dataset: Any, seq_length: int, seed: int, split: str, description: str = ""):
        self.dataset = dataset
        self.seq_length, self.seed = int(seq_length), int(seed)
        self.split_code = SPLIT_CODES[split]
        self.num_samples = len(dataset)
        if self.num_samples < 1:
            raise InputError(f"{description}: no samples of seq_length+1={seq_length + 1} tokens; "
                             "use more data, a larger share of data.split, or a shorter data.seq_length")
        self.description = description
        self._epoch, self._perm = 0, None

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, j = divmod(int(index), self.num_samples)
        if epoch > 0:
            if epoch != self._epoch:
                rng = np.random.default_rng([self.seed, self.split_code, epoch])
                self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
            j = int(self._perm[j])
        item = self.dataset[j]
        tokens, labels = np.asarray(item["tokens"]), np.asarray(item["labels"])
        # GPTDataset draws seq_length+1 ids and returns tokens = ids[:-1], labels = ids[1:]
        # (padding zeroed in both, with loss_mask 0), so this rebuilds ids exactly.
        text = np.concatenate([tokens, labels[-1:]]).astype(np.int64)
        return text, np.asarray(item["loss_mask"], dtype=np.float32)


# ---------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``patterns`` (paths or globs), each glob's matches sorted; errors if one matches nothing."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise InputError(f"input {pattern!r} matches no file")
        files.extend(m for m in matches if Path(m).is_file())
    return files


def _not_utf8(path: str, lineno: int, exc: UnicodeDecodeError, column: int) -> InputError:
    byte = exc.object[exc.start]
    return InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{byte:02x} at byte {column} of the line: "
                      f"{exc.reason}); re-encode the file as UTF-8, e.g. "
                      f"`iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix}`")


def iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a JSON-lines file (numbers from 1).

    Lines are decoded as UTF-8 one by one (the file is read as bytes), so an error
    names the file and the line.

    Raises:
        InputError: a line is not UTF-8 or not valid JSON.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, lineno, exc, exc.start + 1) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{lineno}: not valid JSON ({exc})") from None


def iter_texts(path: str, text_key: str = "text"):
    """Texts of one input file: one per JSON line for ``.jsonl``/``.json``, else the whole file as one text.

    Raises:
        InputError: a line is not UTF-8 or not a JSON object with ``text_key``
            (naming the file and the line).
    """
    if Path(path).suffix.lower() in JSON_LINES_SUFFIXES:
        for lineno, row in iter_json_lines(path):
            if not isinstance(row, dict) or text_key not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"{path}:{lineno}: no key {text_key!r} (found {keys}); set data.text_key "
                                 "(or --text-key) to the key holding the text")
            yield str(row[text_key])
    else:
        raw = Path(path).read_bytes()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_start = raw.rfind(b"\n", 0, exc.start) + 1
            raise _not_utf8(path, raw.count(b"\n", 0, exc.start) + 1, exc, exc.start - line_start + 1) from None


def split_ranges(num_docs: int, split: str) -> dict[str, tuple[int, int]]:
    """Contiguous document ranges per split from a megatron split string (``"98,1,1"``)."""
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise InputError(f"data.split={split!r}: write comma-separated numbers such as 98,1,1") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"data.split={split!r}: weights must be >= 0 with a positive sum")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    edges = [int(round(b * num_docs)) for b in bounds]
    return {name: (edges[i], edges[i + 1]) for i, name in enumerate(("train", "valid", "test"))}


def jsonl_source(paths: Sequence[str], tokenizer: Tokenizer, *, seq_length: int, seed: int, split: str,
                 split_spec: str, text_key: str = "text") -> PackedSource:
    """A :class:`PackedSource` over the ``split`` documents of JSONL/text files."""
    files = expand_inputs(paths)
    texts = [t for f in files for t in iter_texts(f, text_key)]
    lo, hi = split_ranges(len(texts), split_spec)[split]
    if hi <= lo:
        raise InputError(f"data.split={split_spec!r} leaves no {split} documents out of {len(texts)} in "
                         f"{', '.join(files)}; give that split a larger share or more documents")
    eos = tokenizer.eos_id
    pieces = [np.asarray(ids + [eos], dtype=np.int64) for ids in tokenizer.encode_batch_ids(texts[lo:hi]) if ids]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return PackedSource(stream, seq_length, seed, split, description=f"jsonl({', '.join(files)})")


# ---------------------------------------------------------------------------
# megatron-core GPTDataset
# ---------------------------------------------------------------------------


class _AnonymousTokenizer:
    """Stands in for a tokenizer when indexed data comes without one (GPTDataset only reads these)."""

    vocab_size = None
    eod = None
    unique_identifiers = {"class": "distill_plugins.NoTokenizer"}


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """Let megatron's BlendedDataset run in a single process.

    megatron-core 0.16 ``BlendedDataset._build_indices`` calls
    ``torch.distributed.get_rank()`` without checking that a process group
    exists; GPTDataset checks. Without a process group we are rank 0, so
    answer that for the duration of the build.
    """
    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def megatron_sources(*, blend: Optional[tuple[list[str], Optional[list[float]]]] = None,
                     blend_per_split: Optional[list] = None, split_spec: Optional[str] = None,
                     sizes: list[Optional[int]], seq_length: int, seed: int, tokenizer: Optional[Tokenizer],
                     cache_path: Optional[str]) -> dict[str, Optional[MegatronSource]]:
    """Build train/valid/test :class:`MegatronSource` with ``BlendedMegatronDatasetBuilder``.

    Collective when ``torch.distributed`` is initialised: every rank of the
    world must call it (megatron builds the index caches on rank 0 first,
    then the others read them after a barrier).

    Args:
        blend: ``(prefixes, weights or None)`` split by ``split_spec``; or
        blend_per_split: three blends (train, valid, test), each ``(prefixes, None)`` or None.
        sizes: samples to build per split (None: one epoch; only without weights).
        cache_path: directory for megatron's index caches (shared by all ranks).
    """
    # megatron-core takes seconds to import; this module also serves `distill data prepare` and the text
    # readers, which never build megatron datasets
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = list(blend[0]) if blend else [p for b in blend_per_split or [] if b for p in b[0]]
    for prefix in prefixes:
        if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
            raise InputError(f"indexed dataset {prefix!r} not found (need {prefix}.bin and {prefix}.idx); "
                             "data.paths take prefixes without the extension; build them with `distill data prepare`")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=blend_per_split,
        split=split_spec if blend else None, path_to_cache=cache_path,
        tokenizer=tokenizer if tokenizer is not None else _AnonymousTokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    with _rank_zero_without_process_group():
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    names = ("train", "valid", "test")
    return {name: (MegatronSource(ds, seq_length, seed, name, description=f"indexed {name} ({', '.join(prefixes)})")
                   if ds is not None else None) for name, ds in zip(names, datasets)}
