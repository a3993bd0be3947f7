"""Data: tokenizers, the embedded corpus, megatron indexed datasets and resumable training iterators.

Importing this package does not import megatron-core (its dataset classes are
imported when indexed data is written or read). See docs/data.md.

Engine entry points: :func:`build_data` (training microbatches of one DP rank,
resumable by consumed samples), :func:`build_eval_data` (a fixed held-out set)
and :func:`resolve_tokenizer` (the recipe's tokenizer, for the vocabulary size).
Cross-tokenizer aligners use :func:`build_aligned_data` and
:func:`build_aligned_eval_data` instead (raw text encoded and aligned by both tokenizers).
"""

from .embedded import DEFAULT_VOCAB_SIZE, EmbeddedData, build_embedded
from .indexed import write_indexed_dataset
from .iterators import EvalData, MicrobatchIterator, build_data, build_eval_data, resolve_tokenizer
from .text_batches import AlignedMicrobatchIterator, build_aligned_data, build_aligned_eval_data
from .tokenizer import EOS_TOKEN, Encoding, Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DEFAULT_VOCAB_SIZE", "EOS_TOKEN", "AlignedMicrobatchIterator", "EmbeddedData", "Encoding", "EvalData",
    "MicrobatchIterator", "Tokenizer", "build_aligned_data", "build_aligned_eval_data", "build_data", "build_embedded",
    "build_eval_data", "load_tokenizer", "resolve_tokenizer", "train_bpe_tokenizer", "write_indexed_dataset",
]
