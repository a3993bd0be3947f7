"""Tokenizer loading and byte-level views of two vocabularies.

Design
------
Cross-tokenizer aligners compare *text*, never token strings: byte-level BPE
writes a leading space as ``Ġ``, SentencePiece as ``▁`` and unknown bytes as
``<0xNN>``, so two vocabularies that share a token rarely spell it the same
way. :func:`token_bytes` turns every id into the exact bytes it stands for
(``None`` for special tokens and ids whose bytes cannot be known), and
:class:`VocabMap` pairs the ids of two vocabularies whose bytes are equal.

Tokenizers are loaded from local files only: a ``tokenizers`` JSON file, or a
Hugging Face tokenizer directory (its ``tokenizer.json`` is read directly; a
directory without one needs ``transformers``). :func:`load_tokenizer` switches
off offset trimming in a byte-level post-processor, because trimmed offsets
move token boundaries off the text and would make exact alignment miss pairs.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..data.tokenizer import Tokenizer as DataTokenizer
from ..data.tokenizer import load_tokenizer as load_data_tokenizer
from ..errors import InputError

__all__ = ["load_tokenizer", "as_backend", "token_bytes", "byte_lengths", "special_ids", "VocabMap", "is_byte_level",
           "same_vocabulary"]


def as_backend(tok: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind ``tok``: a spec/path, the data package's wrapper, or itself."""
    if isinstance(tok, (str, os.PathLike)):
        return load_tokenizer(str(tok))
    if hasattr(tok, "get_vocab") and hasattr(tok, "to_str"):
        return tok
    backend = tok.backend if isinstance(tok, DataTokenizer) else None
    if backend is None:
        raise InputError(f"tokenizer {getattr(tok, 'name', tok)!r} has no fast (Rust) tokenizers backend; "
                         "cross-tokenizer alignment reads character offsets: save a fast tokenizer "
                         "(tokenizer.json) and point data.tokenizer / data.teacher_tokenizer at it")
    _untrim_offsets(backend)
    return backend


def load_tokenizer(path: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a tokenizer spec, loaded by the data package's one loader.

    :func:`distill_plugins.data.tokenizer.load_tokenizer` applies the rules
    (``tokenizer.json`` file, Hugging Face directory, ``embedded:N``);
    :func:`as_backend` then requires the fast (Rust) backend, because
    alignment reads character offsets.

    Raises:
        InputError: no such tokenizer, or one without a fast backend.
    """
    return as_backend(load_data_tokenizer(path))


def _untrim_offsets(tok: Any) -> None:
    """Report untrimmed offsets: ``Ġhello`` covers its space, as the text does."""
    proc = tok.post_processor
    if proc is not None and hasattr(proc, "trim_offsets"):
        try:
            proc.trim_offsets = False
            tok.post_processor = proc
        except Exception:  # a processor type without a settable flag: byte checks catch bad offsets
            pass


def _tokenizer_json(tok: Any) -> dict:
    return json.loads(tok.to_str())


def is_byte_level(tok: Any) -> bool:
    """True when the tokenizer's decoder or pre-tokenizer is byte-level (GPT-2 alphabet)."""
    cfg = _tokenizer_json(tok)
    return "ByteLevel" in json.dumps(cfg.get("decoder")) or "ByteLevel" in json.dumps(cfg.get("pre_tokenizer"))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode character -> byte table (inverse of bytes_to_unicode)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special added tokens."""
    decoder = tok.get_added_tokens_decoder()
    return {i for i, t in decoder.items() if getattr(t, "special", True)}


def token_bytes(tok: Any) -> list[Optional[bytes]]:
    """The bytes each id stands for, indexed by id; ``None`` for specials and unknowable ids.

    Byte-level vocabularies map each character through GPT-2's byte table.
    Others replace ``▁`` by a space and read ``<0xNN>`` byte-fallback tokens
    as one byte; continuation prefixes such as WordPiece ``##`` are not
    interpreted, so such vocabularies align less.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    out: list[Optional[bytes]] = [None] * size
    specials = special_ids(tok)
    table = _byte_decoder() if is_byte_level(tok) else None
    for text, i in vocab.items():
        if i in specials:
            continue
        if table is not None:
            try:
                out[i] = bytes(table[c] for c in text)
            except KeyError:  # a non-special added token written in plain text
                out[i] = text.encode("utf-8")
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            try:
                out[i] = bytes([int(text[3:5], 16)])
            except ValueError:
                out[i] = text.encode("utf-8")
        else:
            out[i] = text.replace("\u2581", " ").encode("utf-8")
    return out


def byte_lengths(tok: Any) -> Optional[np.ndarray]:
    """int64 ``[vocab]`` byte length of each id (0 for specials), or None when unknowable.

    Known for byte-level vocabularies and SentencePiece-style ones (``▁``,
    byte fallback). Exact alignment checks token boundaries against the
    text's UTF-8 offsets with this table.
    """
    cfg = json.dumps(_tokenizer_json(tok).get("decoder"))
    if not (is_byte_level(tok) or "Metaspace" in cfg or "ByteFallback" in cfg):
        return None
    return np.array([0 if b is None else len(b) for b in token_bytes(tok)], dtype=np.int64)


def same_vocabulary(tok_a: Any, tok_b: Any) -> bool:
    """True when both tokenizers give every token string the same id."""
    return tok_a.get_vocab(with_added_tokens=True) == tok_b.get_vocab(with_added_tokens=True)


@dataclass(frozen=True)
class VocabMap:
    """Ids of two vocabularies that stand for the same bytes.

    Attributes:
        student_ids: int64 ``[K]`` student ids of the shared tokens, ascending.
        teacher_ids: int64 ``[K]`` the teacher id with the same bytes, paired
            element-wise with ``student_ids``.
        student_vocab_size, teacher_vocab_size: real vocabulary sizes.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_vocab_size: int
    teacher_vocab_size: int

    @classmethod
    def from_tokenizers(cls, student_tok: Any, teacher_tok: Any) -> "VocabMap":
        """Pair every id whose bytes occur in both vocabularies (specials excluded).

        When one side has several ids with the same bytes, the lowest id wins.
        """
        s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
        t_index: dict[bytes, int] = {}
        for i, b in enumerate(t_bytes):
            if b is not None and b not in t_index:
                t_index[b] = i
        seen: set[bytes] = set()
        pairs = []
        for i, b in enumerate(s_bytes):
            if b is not None and b in t_index and b not in seen:
                seen.add(b)
                pairs.append((i, t_index[b]))
        arr = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        return cls(arr[:, 0].contiguous(), arr[:, 1].contiguous(), len(s_bytes), len(t_bytes))

    @classmethod
    def identity(cls, vocab_size: int) -> "VocabMap":
        ids = torch.arange(vocab_size)
        return cls(ids, ids.clone(), vocab_size, vocab_size)

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    def teacher_to_student(self) -> torch.Tensor:
        """int64 ``[teacher_vocab_size]``: the student id with the same bytes, or -1."""
        out = torch.full((self.teacher_vocab_size,), -1, dtype=torch.long)
        out[self.teacher_ids] = self.student_ids
        return out

    def student_to_teacher(self) -> torch.Tensor:
        """int64 ``[student_vocab_size]``: the teacher id with the same bytes, or -1."""
        out = torch.full((self.student_vocab_size,), -1, dtype=torch.long)
        out[self.student_ids] = self.teacher_ids
        return out
