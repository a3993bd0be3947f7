"""The embedded corpus's megatron indexed datasets (and the tokenizer they are cut with).

The corpus itself (standard-library docstrings, three JSONL splits) is
:mod:`distill_plugins.data.embedded_corpus`; the byte-level BPE trained on its
train split is :func:`distill_plugins.data.tokenizer.embedded_tokenizer` (spec
``embedded:N``). :func:`build_embedded` adds the tokenized splits, cached beside
the corpus as ``bpe<N>/{train,valid,test}.bin/.idx`` (or ``tok-<fingerprint>/``
for another tokenizer), so the demo, the tests and small experiments need no download.

Usage::

    data = build_embedded(vocab_size=4096)     # builds what is missing
    data.prefixes["train"], data.tokenizer_path
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..logging import global_rank
from .cache import PathLike, file_lock
from .embedded_corpus import SPLITS, EmbeddedCorpus, build_embedded_corpus
from .indexed import indexed_exists, write_indexed_dataset
from .tokenizer import Tokenizer, embedded_tokenizer, embedded_tokenizer_path, load_tokenizer

__all__ = ["DEFAULT_VOCAB_SIZE", "EmbeddedData", "build_embedded"]

#: Default vocabulary size of the embedded tokenizer (``embedded:4096``).
DEFAULT_VOCAB_SIZE = 4096


@dataclass(frozen=True)
class EmbeddedData:
    """An embedded corpus with its tokenizer and indexed datasets."""

    corpus: EmbeddedCorpus
    tokenizer_path: Path
    prefixes: dict  # split -> indexed dataset prefix (str)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)


def build_embedded(vocab_size: int = DEFAULT_VOCAB_SIZE, *, tokenizer: Optional[Tokenizer] = None,
                   cache: Optional[PathLike] = None, include: Optional[Sequence[str]] = None,
                   progress: Optional[bool] = None) -> EmbeddedData:
    """Corpus, tokenizer and indexed datasets of the embedded corpus, building what is missing.

    Args:
        vocab_size: size of the embedded BPE (ignored when ``tokenizer`` is given).
        tokenizer: tokenize the corpus with this tokenizer instead (its indexed
            datasets are cached under ``tok-<fingerprint>/``).
        cache, include, progress: see :func:`build_embedded_corpus`.
    """
    progress = global_rank() == 0 if progress is None else progress
    corpus = build_embedded_corpus(cache, include=include, progress=progress)
    if tokenizer is None:
        tok = embedded_tokenizer(vocab_size, corpus=corpus, progress=progress)
        tok_path, out = embedded_tokenizer_path(corpus, vocab_size), corpus.directory / f"bpe{vocab_size}"
    else:
        tok, out = tokenizer, corpus.directory / f"tok-{tokenizer.fingerprint()}"
        tok_path = Path(tokenizer.name)
    prefixes = {}
    for split in SPLITS:
        prefix = out / split
        with file_lock(str(prefix) + ".lock"):
            if not indexed_exists(prefix):
                write_indexed_dataset(corpus.texts(split), tok, prefix, progress=progress,
                                      total=corpus.manifest["splits"][split]["documents"],
                                      desc=f"tokenizing embedded {split}")
        prefixes[split] = str(prefix)
    return EmbeddedData(corpus, tok_path, prefixes)
