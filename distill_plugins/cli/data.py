"""``distill data prepare``: tokenize text or JSONL into megatron indexed datasets.

Two modes:

* files: ``--input`` (files or globs; ``.jsonl``/``.json`` read one document
  per line from ``--text-key``, anything else is one document per file) are
  tokenized into ``--output-prefix.bin``/``.idx``, an EOS after every
  document. The tokenizer is ``--tokenizer`` (JSON file, HF directory or
  ``embedded:N``); with ``--vocab-size`` and no existing tokenizer a byte-level
  BPE is trained on the inputs first and saved to ``--tokenizer`` (or
  ``PREFIX.tokenizer.json``).
* ``--embedded``: build the embedded stdlib-docstring corpus, its
  ``--vocab-size`` BPE (default 4096) and its train/valid/test indexed
  datasets in the cache (``--cache-dir``, ``$DISTILL_CACHE`` or
  ``~/.cache/distill_plugins``), and print where they are.

Wiring (done in ``distill_plugins/cli/main.py``)::

    from distill_plugins.cli import data as data_cli
    data_cli.add_parser(subparsers)   # adds `data prepare`; args.func(args) -> exit code
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill_plugins.data.embedded import DEFAULT_VOCAB_SIZE, build_embedded
from distill_plugins.data.indexed import write_indexed_dataset
from distill_plugins.data.sources import expand_inputs, iter_texts
from distill_plugins.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from distill_plugins.errors import InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``data`` (with ``prepare``) to an argparse subparsers object; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="prepare training data (indexed datasets, the embedded corpus)",
                                 description="Data preparation commands.")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "prepare", help="tokenize text/JSONL (or the embedded corpus) into megatron .bin/.idx",
        description=__doc__.split("Wiring")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="FILE", help="input files or globs (.jsonl/.json: one document per line)")
    p.add_argument("--output-prefix", metavar="PREFIX", help="write PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", metavar="SPEC", help="tokenizers JSON file, HF tokenizer directory, or embedded:N; "
                   "with --vocab-size, the path to save a newly trained tokenizer to")
    p.add_argument("--text-key", default="text", help="JSON key holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="train a byte-level BPE of N tokens (files mode: on "
                   "the inputs, when --tokenizer does not exist yet; --embedded: on the corpus, default 4096)")
    p.add_argument("--embedded", action="store_true", help="build the embedded stdlib-docstring corpus, its "
                   "tokenizer and train/valid/test indexed datasets in the cache")
    p.add_argument("--cache-dir", metavar="DIR", help="cache root for --embedded (default $DISTILL_CACHE or "
                   "~/.cache/distill_plugins)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress on stderr")
    p.set_defaults(func=run_prepare)
    return data


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of ``distill data prepare``; returns the exit code. Raises InputError on bad arguments."""
    progress = not args.no_progress
    if args.embedded:
        if args.input or args.output_prefix:
            raise InputError("--embedded builds the embedded corpus; do not combine it with --input/--output-prefix")
        tok = None
        if args.tokenizer and not args.tokenizer.startswith("embedded:"):
            tok = load_tokenizer(args.tokenizer)
        vocab = args.vocab_size or (int(args.tokenizer.split(":", 1)[1]) if args.tokenizer else DEFAULT_VOCAB_SIZE)
        built = build_embedded(vocab, tokenizer=tok, cache=args.cache_dir, progress=progress)
        splits = built.corpus.manifest["splits"]
        _out(f"embedded corpus: {built.corpus.directory}")
        for name, prefix in built.prefixes.items():
            _out(f"  {name:5s} {splits[name]['documents']:6d} docs  {prefix}")
        _out(f"tokenizer: {built.tokenizer_path}")
        spec = f"embedded:{vocab}" if tok is None else str(args.tokenizer)
        _out("\nrecipe:\n  data:\n    kind: embedded\n" + f"    tokenizer: {spec}")
        return 0

    if not args.input or not args.output_prefix:
        raise InputError("give --input FILE... and --output-prefix PREFIX (or --embedded)")
    files = expand_inputs(args.input)

    def texts():
        for f in files:
            yield from iter_texts(f, args.text_key)

    tok_path = Path(args.tokenizer) if args.tokenizer and not args.tokenizer.startswith("embedded:") else None
    if args.tokenizer and (args.tokenizer.startswith("embedded:") or tok_path.exists()):
        tok = load_tokenizer(args.tokenizer)
    elif args.vocab_size:
        tok_path = tok_path or Path(f"{args.output_prefix}.tokenizer.json")
        tok = train_bpe_tokenizer(texts(), args.vocab_size)
        tok.save(tok_path)
        _out(f"trained a byte-level BPE of {tok.vocab_size} tokens: {tok_path}")
    elif args.tokenizer:
        raise InputError(f"--tokenizer {args.tokenizer!r} does not exist; add --vocab-size N to train one there")
    else:
        raise InputError("give --tokenizer SPEC, or --vocab-size N to train a tokenizer on the inputs")
    stats = write_indexed_dataset(texts(), tok, args.output_prefix, progress=progress)
    _out(f"wrote {stats.documents} documents, {stats.tokens} tokens: {stats.prefix}.bin/.idx")
    _out(f"\nrecipe:\n  data:\n    kind: indexed\n    paths: [{stats.prefix}]\n    tokenizer: {tok_path or args.tokenizer}")
    return 0
