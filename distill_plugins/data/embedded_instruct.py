"""The embedded instruction task: describe a standard-library function from its signature.

Every Python installation ships its standard library's source, so every
machine can build a prompt/response task without a download. Like the
embedded corpus (:mod:`distill_plugins.data.embedded_corpus`), the sources
are read with :mod:`ast` and nothing is imported or executed.

Task
----
One example per documented function, method or class::

    prompt:   Summarize the method Text.tag_nextrange(self, tagName, index1, index2=None) of module tkinter.
    response: Return a list of start and end index for the first sequence of characters between INDEX1 and
              INDEX2 which all have tag TAGNAME. The text is searched forward from INDEX1.

The response is the first paragraph of the docstring (up to the first blank
line) with its whitespace collapsed to single spaces; examples whose paragraph
has fewer than 3 or more than 60 words are left out (one-word stubs such as
"Constructor." carry no task, long ones do not fit small windows). Signatures
longer than 80 characters are cut at a comma and end with ``...``. When one
file has two definitions with the same prompt (a property's getter and
setter), the first is kept. A reference answer is predictable only from the
name, signature and module, so ROUGE-L against it measures how much of the
library's documentation style and vocabulary a model has learned, and a larger
model scores higher.

Split (no leakage)
------------------
By **package**, the first component of the file's path (``json`` for
``json/decoder.py``, ``textwrap`` for ``textwrap.py``), so no module, and no
package, has examples in two splits: packages with more than 150 examples
(``tkinter``, ``idlelib``, ``asyncio``, ...) are always train; every other
package is valid when ``u < 0.08``, test when ``0.08 <= u < 0.16``, else train,
with ``u`` the first 32 bits of ``SHA-256(package)`` over ``2**32``. On
Python 3.11 that gives about 6,900 train, 360 valid and 360 test examples. A
package's split depends on its name and size only, never on what else is
installed.

Leakage note: the embedded *docstring corpus* (``data.kind: embedded``) and
the ``embedded:N`` tokenizers trained on it contain the valid and test
responses (that corpus is split by document, not by package). The tokenizer's
merges hardly matter; but do not pre-train a teacher for this task on that
corpus, or its test score measures recall. ``manifest.json`` also counts the
held-out responses whose exact text occurs in train (short generic phrases).

Cache: ``$DISTILL_CACHE/embedded/instruct-py<version>-v1/{train,valid,test}.jsonl``
(``{"id", "package", "module", "prompt", "response"}`` per line) and
``manifest.json`` (written last: counts, packages and SHA-256 per split).

Usage::

    task = build_embedded_instruct()
    task.jsonl["valid"]          # a data.kind: instruct file (prompt/response records)
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..logging import get_logger, global_rank
from .cache import PathLike, atomic_path, cache_dir, embedded_cache_key, file_lock, write_json_atomic
from .embedded_corpus import SPLITS, stdlib_files, stdlib_root
from .progress import Progress

__all__ = ["INSTRUCT_VERSION", "EmbeddedInstruct", "build_embedded_instruct", "examples_of_file", "package_of",
           "split_of_package"]

log = get_logger(__name__)

#: Bump when the example format or split rule changes (invalidates caches).
INSTRUCT_VERSION = 1
#: Packages with more examples than this are always train.
LARGE_PACKAGE = 150
#: Shares of the hash range for valid and test (for packages up to LARGE_PACKAGE examples).
VALID_SHARE = 0.08
TEST_SHARE = 0.08
MIN_WORDS, MAX_WORDS = 3, 60
MAX_SIGNATURE = 80


def package_of(rel: str) -> str:
    """The package of a stdlib file: the first component of its relative path, without ``.py``."""
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def split_of_package(package: str, num_examples: int) -> str:
    """``train``, ``valid`` or ``test`` for a package (module docstring)."""
    if num_examples > LARGE_PACKAGE:
        return "train"
    u = int(hashlib.sha256(package.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if u < VALID_SHARE:
        return "valid"
    if u < VALID_SHARE + TEST_SHARE:
        return "test"
    return "train"


def _module_of(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        text = ", ".join(ast.unparse(b) for b in node.bases)
        return f"({text})" if text else ""
    text = ast.unparse(node.args)
    if len(text) > MAX_SIGNATURE:
        cut = text.rfind(", ", 0, MAX_SIGNATURE)
        text = (text[:cut] if cut > 0 else text[:MAX_SIGNATURE]) + ", ..."
    return f"({text})"


def _kind(node: ast.AST, in_class: bool) -> str:
    if isinstance(node, ast.ClassDef):
        return "class"
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    return prefix + ("method" if in_class else "function")


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph (to the first blank line), whitespace collapsed."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(" ".join(lines).split())


def examples_of_file(root: PathLike, rel: str) -> list[dict]:
    """The examples (``{"id", "package", "module", "prompt", "response"}``) of one stdlib file, in source order."""
    try:
        tree = ast.parse(Path(root, rel).read_bytes(), filename=rel)
    except (SyntaxError, ValueError, OSError):
        return []
    module, package = _module_of(rel), package_of(rel)
    out: list[dict] = []
    prompts: set[str] = set()

    def visit(node: ast.AST, qual: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            name = f"{qual}.{child.name}" if qual else child.name
            doc = ast.get_docstring(child, clean=True)
            if doc:
                response = first_paragraph(doc)
                if MIN_WORDS <= len(response.split()) <= MAX_WORDS:
                    prompt = f"Summarize the {_kind(child, in_class)} {name}{_signature(child)} of module {module}."
                    if prompt not in prompts:
                        prompts.add(prompt)
                        out.append({"id": f"{rel}:{name}", "package": package, "module": module,
                                    "prompt": prompt, "response": response})
            visit(child, name, isinstance(child, ast.ClassDef))

    visit(tree, "", False)
    return out


@dataclass(frozen=True)
class EmbeddedInstruct:
    """Paths of a built embedded instruction task."""

    directory: Path
    jsonl: dict  # split -> Path of the JSONL file
    manifest: dict


def build_embedded_instruct(cache: Optional[PathLike] = None, *, include: Optional[Sequence[str]] = None,
                            root: Optional[PathLike] = None, progress: Optional[bool] = None) -> EmbeddedInstruct:
    """Build (or find) the three JSONL splits of the embedded instruction task.

    Args:
        cache: cache root (default :func:`~distill_plugins.data.cache.cache_dir`).
        include: optional ``fnmatch`` patterns on stdlib paths for a subset (tests).
        root: stdlib directory (default :func:`~distill_plugins.data.embedded_corpus.stdlib_root`).
        progress: show progress on stderr (default: on global rank 0 only).
    """
    progress = global_rank() == 0 if progress is None else progress
    root = Path(root) if root is not None else stdlib_root()
    directory = Path(cache if cache is not None else cache_dir()) / "embedded" / embedded_cache_key("instruct", INSTRUCT_VERSION, include)
    manifest_path = directory / "manifest.json"
    with file_lock(directory / ".lock"):
        if not manifest_path.is_file():
            files = stdlib_files(root, include)
            examples: list[dict] = []
            with Progress("reading stdlib signatures", total=len(files), unit="files", enabled=progress) as bar:
                for rel in files:
                    examples.extend(examples_of_file(root, rel))
                    bar.update()
            if not examples:
                raise RuntimeError(f"the embedded instruction task is empty: no documented functions under {root}")
            sizes = Counter(ex["package"] for ex in examples)
            split_of = {pkg: split_of_package(pkg, n) for pkg, n in sizes.items()}
            by_split = {s: [ex for ex in examples if split_of[ex["package"]] == s] for s in SPLITS}
            train_responses = {ex["response"] for ex in by_split["train"]}
            splits = {}
            for split in SPLITS:
                lines = [json.dumps(ex, ensure_ascii=False, sort_keys=True) + "\n" for ex in by_split[split]]
                with atomic_path(directory / f"{split}.jsonl") as tmp:
                    tmp.write_text("".join(lines), encoding="utf-8")
                splits[split] = {
                    "examples": len(lines),
                    "packages": sorted(p for p, s in split_of.items() if s == split),
                    "responses_also_in_train": (0 if split == "train" else
                                                sum(ex["response"] in train_responses for ex in by_split[split])),
                    "sha256": hashlib.sha256("".join(lines).encode("utf-8")).hexdigest(),
                }
            manifest = {"instruct_version": INSTRUCT_VERSION, "python": sys.version.split()[0],
                        "include": list(include) if include is not None else None,
                        "rule": {"large_package": LARGE_PACKAGE, "valid_share": VALID_SHARE,
                                 "test_share": TEST_SHARE, "words": [MIN_WORDS, MAX_WORDS]},
                        "splits": splits}
            write_json_atomic(manifest_path, manifest)
            log.info("embedded instruction task written to %s: %s", directory,
                     ", ".join(f"{s} {splits[s]['examples']} examples" for s in SPLITS))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return EmbeddedInstruct(directory, {s: directory / f"{s}.jsonl" for s in SPLITS}, manifest)
