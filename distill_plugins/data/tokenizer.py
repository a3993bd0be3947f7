"""Tokenizers: load a ``tokenizers`` JSON file or a Hugging Face directory, or train a byte-level BPE.

Design: one small wrapper, :class:`Tokenizer`, hides where a tokenizer came
from. Everything the toolkit needs is there: ``encode`` (ids and character
offsets, used by cross-tokenizer aligners), ``decode``, ``vocab_size``, the
end-of-document id ``eos_id`` and the token strings. The wrapper also offers
the attributes megatron-core's ``GPTDataset`` reads from its tokenizer
(``eod``, ``vocab_size``, ``unique_identifiers``), so it can be handed there
directly.

Tokenizer specs (``data.tokenizer`` in a recipe, ``--tokenizer`` on the CLI):

* ``path/to/tokenizer.json``: a ``tokenizers`` JSON file;
* ``path/to/dir``: a Hugging Face tokenizer directory; its ``tokenizer.json``
  is read with the ``tokenizers`` library, and only when it has none is
  ``transformers`` imported (lazily, optional dependency);
* ``embedded:N``: the byte-level BPE of vocabulary ``N`` trained on the
  embedded corpus's training split (:func:`embedded_tokenizer`: built and cached
  on first use; the corpus is :mod:`distill_plugins.data.embedded_corpus`).

Training (:func:`train_bpe_tokenizer`) is deterministic: the same texts in the
same order and the same vocabulary size give byte-identical JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tokenizers import Tokenizer as _HFTokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..errors import InputError
from ..logging import get_logger
from .cache import PathLike, atomic_path, file_lock
from .embedded_corpus import EmbeddedCorpus, build_embedded_corpus

log = get_logger(__name__)

#: End-of-document token added to every trained tokenizer (id 0).
EOS_TOKEN = "<|endoftext|>"

#: Candidate end-of-document tokens looked up in loaded tokenizers, in order.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]", "<|eot_id|>")


@dataclass(frozen=True)
class Encoding:
    """Token ids of a text and, for each token, its ``(start, end)`` character span in the text."""

    ids: list[int]
    offsets: list[tuple[int, int]]


class Tokenizer:
    """A loaded tokenizer (wraps ``tokenizers.Tokenizer``; or a ``transformers`` one as fallback).

    Attributes:
        name: where it came from (path or spec), for messages and cache keys.
        vocab_size: number of token ids (including added special tokens).
        eos_id: id appended after every document (``eod`` for megatron).
    """

    def __init__(self, backend: Any, *, name: str, eos_id: Optional[int] = None, hf: Any = None):
        self._tok = backend  # tokenizers.Tokenizer, or None when only ``hf`` is available
        self._hf = hf
        self.name = name
        if backend is not None:
            self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        else:
            self.vocab_size = int(len(hf))
        self.eos_id = eos_id if eos_id is not None else self._find_eos()
        # megatron-core's dataset classes hash these into their cache keys.
        self.unique_identifiers = {"class": "distill_plugins.Tokenizer", "name": name,
                                   "vocab_size": self.vocab_size, "eod": self.eos_id}

    @property
    def backend(self) -> Any:
        """The fast ``tokenizers.Tokenizer`` (character offsets), or None for a slow HF tokenizer."""
        return self._tok

    # -- construction -----------------------------------------------------
    def _find_eos(self) -> int:
        if self._hf is not None and getattr(self._hf, "eos_token_id", None) is not None:
            return int(self._hf.eos_token_id)
        for token in _EOS_CANDIDATES:
            tid = self.token_to_id(token)
            if tid is not None:
                return tid
        raise InputError(f"tokenizer {self.name!r} has no end-of-document token (looked for "
                         f"{', '.join(_EOS_CANDIDATES)}); add one of them as a special token")

    # -- the API ----------------------------------------------------------
    def encode(self, text: str) -> Encoding:
        """Token ids of ``text`` (no special tokens added) and their character offsets."""
        if self._tok is not None:
            enc = self._tok.encode(text, add_special_tokens=False)
            return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])
        out = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return Encoding(list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]])

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` only (faster than :meth:`encode` when offsets are not needed)."""
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._hf(text, add_special_tokens=False)["input_ids"])

    def encode_batch_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (uses the library's parallel batch encoder)."""
        if self._tok is not None:
            return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode_ids(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``."""
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The token string of ``token_id`` (byte-level BPE shows spaces as ``Ġ``)."""
        if self._tok is not None:
            return self._tok.id_to_token(int(token_id))
        return self._hf.convert_ids_to_tokens(int(token_id))

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None."""
        if self._tok is not None:
            return self._tok.token_to_id(token)
        tid = self._hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == getattr(self._hf, "unk_token_id", object()) else int(tid)

    def tokens(self) -> list[str]:
        """All token strings, indexed by id."""
        return [self.id_to_token(i) or "" for i in range(self.vocab_size)]

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges, for cache keys."""
        if self._tok is not None:
            blob = self._tok.to_str().encode("utf-8")
        else:
            blob = json.dumps(self._hf.get_vocab(), sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: PathLike) -> None:
        """Write the ``tokenizers`` JSON to ``path`` (atomically)."""
        if self._tok is None:
            raise InputError(f"tokenizer {self.name!r} comes from transformers and has no tokenizers JSON to save")
        with atomic_path(path) as tmp:
            self._tok.save(str(tmp))

    # -- what megatron-core's GPTDataset reads --------------------------
    @property
    def eod(self) -> int:
        """End-of-document id (megatron's name for :attr:`eos_id`)."""
        return self.eos_id

    @property
    def eos(self) -> int:
        return self.eos_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: PathLike) -> Tokenizer:
    """Load a tokenizer from a spec (see the module docstring).

    Args:
        spec: ``tokenizer.json`` path, Hugging Face tokenizer directory, or ``embedded:N``.

    Raises:
        InputError: the path does not exist or holds no tokenizer.
    """
    text = str(spec)
    if text.startswith("embedded:"):
        return embedded_tokenizer(_parse_embedded_vocab(text))
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return Tokenizer(_HFTokenizers.from_file(str(path)), name=str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise InputError(f"{path} is not a tokenizers JSON file: {exc}") from exc
    if path.is_dir():
        json_file = path / "tokenizer.json"
        if json_file.is_file():
            backend = _HFTokenizers.from_file(str(json_file))
            return Tokenizer(backend, name=str(path), eos_id=_eos_from_hf_config(path, backend))
        try:
            import transformers  # optional dependency, imported only here
        except ImportError as exc:
            raise InputError(f"{path} has no tokenizer.json; loading it needs transformers "
                             "(pip install 'distill-plugins[hf]')") from exc
        hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # a fast tokenizer converted from vocab files still has a Rust backend (character offsets)
        backend = hf.backend_tokenizer if getattr(hf, "is_fast", False) else None
        return Tokenizer(backend, name=str(path), hf=hf,
                         eos_id=hf.eos_token_id if getattr(hf, "eos_token_id", None) is not None else None)
    raise InputError(f"tokenizer {text!r} not found: give a tokenizers JSON file, a Hugging Face tokenizer "
                     "directory, or embedded:N (e.g. embedded:4096)")


def _parse_embedded_vocab(text: str) -> int:
    try:
        vocab = int(text.split(":", 1)[1])
    except ValueError:
        raise InputError(f"tokenizer {text!r}: write embedded:N with an integer vocabulary size, e.g. embedded:4096") from None
    if vocab < 257:
        raise InputError(f"tokenizer {text!r}: a byte-level BPE needs a vocabulary of at least 257 (256 bytes + EOS)")
    return vocab


def _eos_from_hf_config(path: Path, backend: Any) -> Optional[int]:
    """The eos token named in a HF directory's tokenizer_config.json, if any."""
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return backend.token_to_id(eos) if isinstance(eos, str) else None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts``.

    The alphabet is the 256 byte symbols, id 0 is :data:`EOS_TOKEN`, so every
    text is encodable and ``vocab_size`` is exact unless the texts run out of
    merges. Deterministic for the same texts in the same order.

    Args:
        texts: training documents.
        vocab_size: total vocabulary size, >= 257.
        min_frequency: a pair must occur this often to be merged.
    """
    if vocab_size < 257:
        raise InputError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + EOS)")
    backend = _HFTokenizers(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, name=f"bpe-{vocab_size}", eos_id=backend.token_to_id(EOS_TOKEN))


def embedded_tokenizer_path(corpus: EmbeddedCorpus, vocab_size: int) -> Path:
    """Where the embedded BPE of ``vocab_size`` is cached: ``<corpus dir>/tokenizer-bpe<N>.json``."""
    return corpus.directory / f"tokenizer-bpe{vocab_size}.json"


def embedded_tokenizer(vocab_size: int, *, corpus: Optional[EmbeddedCorpus] = None,
                       progress: Optional[bool] = None) -> Tokenizer:
    """The byte-level BPE of ``vocab_size`` trained on the embedded corpus's train split (spec ``embedded:N``).

    Built once per corpus and vocabulary size (under a file lock, so concurrent
    ranks train it once), then read from the cache.

    Args:
        vocab_size: vocabulary size, >= 257.
        corpus: the corpus (default: :func:`~distill_plugins.data.embedded_corpus.build_embedded_corpus`).
        progress: show progress while building the corpus (default: global rank 0).
    """
    corpus = corpus if corpus is not None else build_embedded_corpus(progress=progress)
    path = embedded_tokenizer_path(corpus, vocab_size)
    with file_lock(str(path) + ".lock"):
        if not path.is_file():
            log.info("training a byte-level BPE tokenizer (vocab %d) on %s", vocab_size, corpus.jsonl["train"])
            tok = train_bpe_tokenizer(corpus.texts("train"), vocab_size)
            tok.save(path)
    tok = load_tokenizer(path)
    tok.name = f"embedded:{vocab_size}"
    return tok
