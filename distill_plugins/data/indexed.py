"""Write and read megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Writing goes through ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``,
one document per input text, each followed by the tokenizer's end-of-document
id (``eos_id``), so GPTDataset's packed samples never run two documents
together without a separator. Token ids are stored as uint16 when the
vocabulary fits (< 65500), else int32, as megatron's own preprocessing does.

Both files are first written under a temporary prefix and renamed into place
(``.bin`` first, ``.idx`` last): an existing ``.idx`` therefore means a
complete dataset.

megatron-core is imported by the two functions that need it, not at module
import: importing it takes seconds, and the modules that import this one (the
embedded datasets, the data iterators) are also used without indexed data.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import InputError
from .cache import PathLike
from .progress import Progress
from .tokenizer import Tokenizer

#: Documents tokenized per batch (the tokenizers library encodes a batch in parallel).
_BATCH = 512


@dataclass(frozen=True)
class IndexedStats:
    """What :func:`write_indexed_dataset` wrote."""

    prefix: str
    documents: int
    tokens: int


def token_dtype(vocab_size: int) -> type:
    """The storage dtype megatron uses for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_indexed_dataset(texts: Iterable[str], tokenizer: Tokenizer, prefix: PathLike, *,
                          total: Optional[int] = None, progress: bool = True, desc: str = "tokenizing") -> IndexedStats:
    """Tokenize ``texts`` into ``prefix.bin``/``prefix.idx``, one EOS-terminated document per text.

    Empty texts are skipped. Returns the number of documents and tokens written.
    """
    # megatron-core takes seconds to import: loaded only when indexed data is written or read
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{prefix}.tmp-{uuid.uuid4().hex[:8]}"
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    docs = tokens = 0
    eos = tokenizer.eos_id
    try:
        with Progress(desc, total=total, unit="docs", enabled=progress) as bar:
            for batch in _batches(texts, _BATCH):
                for ids in tokenizer.encode_batch_ids(batch):
                    if not ids:
                        continue
                    ids.append(eos)
                    builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    docs += 1
                    tokens += len(ids)
                bar.update(len(batch))
        builder.finalize(get_idx_path(tmp_prefix))
        if docs == 0:
            raise InputError(f"no non-empty documents to write to {prefix}")
        os.replace(get_bin_path(tmp_prefix), get_bin_path(prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(prefix))
    finally:
        for path in (f"{tmp_prefix}.bin", f"{tmp_prefix}.idx"):
            if os.path.exists(path):
                os.remove(path)
    return IndexedStats(prefix=prefix, documents=docs, tokens=tokens)


def indexed_exists(prefix: PathLike) -> bool:
    """True if both ``prefix.bin`` and ``prefix.idx`` exist."""
    return os.path.isfile(f"{prefix}.bin") and os.path.isfile(f"{prefix}.idx")


def read_documents(prefix: PathLike) -> list[np.ndarray]:
    """All documents of an indexed dataset as arrays of token ids (for tests and inspection)."""
    # megatron-core takes seconds to import: loaded only when indexed data is written or read
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not indexed_exists(prefix):
        raise InputError(f"indexed dataset {prefix} not found (need {prefix}.bin and {prefix}.idx); "
                         "build it with `distill data prepare`")
    ds = IndexedDataset(str(prefix), mmap=True)
    return [np.array(ds[i]) for i in range(len(ds))]
