"""The embedded corpus: docstrings of the installed Python standard library, as text.

Every machine that runs this toolkit has Python, so it has several MB of
English prose and code: the standard library's docstrings. This module turns
them into a cached corpus of three JSONL splits, so the demo, the tests and
small experiments need no download. The tokenizer trained on it is
:func:`distill_plugins.data.tokenizer.embedded_tokenizer` (spec ``embedded:N``)
and its indexed datasets are :func:`distill_plugins.data.embedded.build_embedded`'s.

Design and guarantees:

* **No imports of arbitrary modules.** Sources under ``sysconfig``'s
  ``stdlib`` path are read with :mod:`ast`; nothing is executed. Directories
  ``site-packages``, ``dist-packages``, ``__pycache__``, ``test``, ``tests``
  and ``idle_test`` are skipped; files that do not parse are skipped.
* **One document per docstring**: the module, class or function it documents
  is named in a header line (``def json.dumps(obj, *, skipkeys=False, ...):``),
  followed by the cleaned docstring (``ast.get_docstring``).
* **Deterministic**: files in sorted order, nodes in source order; a
  document's split is decided by the SHA-256 of its id (``path:qualname``),
  not by its position, so it is the same on every machine with the same
  Python version (the cache key includes the full version): about 96% train,
  2% validation, 2% test.
* **Cached** under ``$DISTILL_CACHE/embedded/stdlib-py<version>-v1/``:
  ``{train,valid,test}.jsonl`` (``{"id", "text"}`` per line) and ``manifest.json``
  (written last; marks the corpus complete). The tokenizers and indexed datasets
  built from it live in the same directory.

Usage::

    corpus = build_embedded_corpus()            # builds it when missing
    for text in corpus.texts("valid"): ...
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..logging import get_logger, global_rank
from .cache import PathLike, atomic_path, cache_dir, embedded_cache_key, file_lock, write_json_atomic
from .progress import Progress

__all__ = ["CORPUS_VERSION", "SPLITS", "EmbeddedCorpus", "build_embedded_corpus", "documents_of_file",
           "iter_documents", "split_of", "stdlib_files", "stdlib_root"]

log = get_logger(__name__)

#: Bump when the document format or split rule changes (invalidates caches).
CORPUS_VERSION = 1
SPLITS = ("train", "valid", "test")
#: Fractions of documents (by id hash) in the validation and test splits.
VALID_FRACTION = 0.02
TEST_FRACTION = 0.02
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The directory holding the standard library's ``.py`` sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Optional[PathLike] = None, include: Optional[Sequence[str]] = None) -> list[str]:
    """Relative POSIX paths of the stdlib ``.py`` files, sorted.

    Args:
        root: stdlib directory (default :func:`stdlib_root`).
        include: optional ``fnmatch`` patterns on the relative path (``json/*``,
            ``textwrap.py``) to take a subset (tests use this).
    """
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                rel = Path(dirpath, name).relative_to(root).as_posix()
                if include is None or any(fnmatch.fnmatch(rel, pat) for pat in include):
                    found.append(rel)
    return sorted(found)


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _header(node: ast.AST, dotted: str) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {dotted}({bases}):" if bases else f"class {dotted}:"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        return f"{prefix} {dotted}({ast.unparse(node.args)}):"
    return f"Module {dotted}"


def documents_of_file(root: PathLike, rel: str) -> list[dict]:
    """The documents (``{"id", "text"}``) of one stdlib file, in source order; [] if it does not parse."""
    try:
        tree = ast.parse(Path(root, rel).read_bytes(), filename=rel)
    except (SyntaxError, ValueError, OSError):
        return []
    module = _module_name(rel)
    docs: list[dict] = []
    seen: dict[str, int] = {}

    def visit(node: ast.AST, qual: str) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if not isinstance(node, ast.Module):
                qual = f"{qual}.{node.name}" if qual else node.name
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                key = f"{rel}:{qual or '<module>'}"
                n = seen.get(key, 0)
                seen[key] = n + 1
                doc_id = key if n == 0 else f"{key}#{n}"
                dotted = f"{module}.{qual}" if qual else module
                docs.append({"id": doc_id, "text": f"{_header(node, dotted)}\n\n{doc.strip()}\n"})
        for child in ast.iter_child_nodes(node):
            visit(child, qual)

    visit(tree, "")
    return docs


def split_of(doc_id: str) -> str:
    """``train``, ``valid`` or ``test`` from the SHA-256 of the document id."""
    bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if bucket < VALID_FRACTION:
        return "valid"
    if bucket < VALID_FRACTION + TEST_FRACTION:
        return "test"
    return "train"


def iter_documents(root: Optional[PathLike] = None, include: Optional[Sequence[str]] = None,
                   progress: bool = False) -> Iterator[dict]:
    """All documents of the stdlib (or the ``include`` subset) in deterministic order."""
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root, include)
    with Progress("reading stdlib docstrings", total=len(files), unit="files", enabled=progress) as bar:
        for rel in files:
            yield from documents_of_file(root, rel)
            bar.update()


# ---------------------------------------------------------------------------
# Cached build
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Paths of a built embedded corpus."""

    directory: Path
    jsonl: dict  # split -> Path of the JSONL file
    manifest: dict

    def texts(self, split: str) -> Iterator[str]:
        """The texts of a split, in file order."""
        with open(self.jsonl[split], encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]


def build_embedded_corpus(cache: Optional[PathLike] = None, *, include: Optional[Sequence[str]] = None,
                          root: Optional[PathLike] = None, progress: Optional[bool] = None) -> EmbeddedCorpus:
    """Build (or find) the JSONL splits of the embedded corpus.

    Args:
        cache: cache root (default :func:`~distill_plugins.data.cache.cache_dir`).
        include: optional file patterns for a subset (see :func:`stdlib_files`).
        root: stdlib directory (default :func:`stdlib_root`).
        progress: show progress on stderr (default: on global rank 0 only).
    """
    progress = global_rank() == 0 if progress is None else progress
    directory = Path(cache if cache is not None else cache_dir()) / "embedded" / embedded_cache_key("stdlib", CORPUS_VERSION, include)
    manifest_path = directory / "manifest.json"
    with file_lock(directory / ".lock"):
        if not manifest_path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            counts = {s: {"documents": 0, "characters": 0} for s in SPLITS}
            hashes = {s: hashlib.sha256() for s in SPLITS}
            with atomic_path(directory / "train.jsonl") as t, atomic_path(directory / "valid.jsonl") as v, \
                    atomic_path(directory / "test.jsonl") as e:
                handles = {"train": open(t, "w", encoding="utf-8"), "valid": open(v, "w", encoding="utf-8"),
                           "test": open(e, "w", encoding="utf-8")}
                try:
                    for doc in iter_documents(root, include, progress=progress):
                        split = split_of(doc["id"])
                        line = json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n"
                        handles[split].write(line)
                        hashes[split].update(line.encode("utf-8"))
                        counts[split]["documents"] += 1
                        counts[split]["characters"] += len(doc["text"])
                finally:
                    for fh in handles.values():
                        fh.close()
            if counts["train"]["documents"] == 0:
                raise RuntimeError(f"the embedded corpus is empty: no docstrings found under {root or stdlib_root()}")
            manifest = {"corpus_version": CORPUS_VERSION, "python": sys.version.split()[0],
                        "include": list(include) if include is not None else None,
                        "splits": {s: {**counts[s], "sha256": hashes[s].hexdigest()} for s in SPLITS}}
            write_json_atomic(manifest_path, manifest)
            log.info("embedded corpus written to %s: %s", directory,
                     ", ".join(f"{s} {counts[s]['documents']} docs" for s in SPLITS))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return EmbeddedCorpus(directory, {s: directory / f"{s}.jsonl" for s in SPLITS}, manifest)
