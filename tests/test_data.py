"""Data: tokenizers, embedded corpus, indexed datasets, resumable iterators, `distill data prepare`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_plugins.cli import data as data_cli
from distill_plugins.data.embedded import build_embedded
from distill_plugins.data.embedded_corpus import (
    build_embedded_corpus,
    documents_of_file,
    split_of,
    stdlib_files,
    stdlib_root,
)
from distill_plugins.data.indexed import read_documents, write_indexed_dataset
from distill_plugins.data.iterators import build_data, build_eval_data, resolve_tokenizer
from distill_plugins.data.sources import split_ranges
from distill_plugins.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from distill_plugins.errors import InputError
from distill_plugins.recipe.schema import DataSpec, ModelSpec, Recipe, TrainingSpec

SUBSET = ["json/*", "textwrap.py", "shlex.py", "argparse.py", "string.py", "calendar.py", "fractions.py",
          "statistics.py", "difflib.py"]
TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7} times.\n" * (1 + i % 3)
         for i in range(60)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("DISTILL_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def subset(cache):
    """Embedded corpus, tokenizer and indexed splits over a few stdlib files (fast)."""
    return build_embedded(400, cache=cache, include=SUBSET, progress=False)


def recipe(**data) -> Recipe:
    training = data.pop("training", TrainingSpec(steps=4, micro_batch_size=2, global_batch_size=8, eval_batches=2))
    student = data.pop("student", ModelSpec())
    output_dir = str(data.pop("output_dir", Path(tempfile.gettempdir()) / "distill-test-data"))
    return Recipe(data=DataSpec(**data), training=training, student=student, seed=7, output_dir=output_dir)


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def test_bpe_training_is_deterministic_and_round_trips(tmp_path):
    a = train_bpe_tokenizer(TEXTS, 300)
    b = train_bpe_tokenizer(TEXTS, 300)
    assert a.fingerprint() == b.fingerprint()
    assert a.vocab_size == 300 and a.eos_id == 0 and a.id_to_token(0) == "<|endoftext|>"
    text = "Hello wörld,\n  def f(x): return x  # ünïcode ✓"
    enc = a.encode(text)
    assert a.decode(enc.ids) == text
    assert len(enc.ids) == len(enc.offsets)
    # offsets are character spans covering the text in order
    assert enc.offsets[0][0] == 0 and enc.offsets[-1][1] == len(text)
    assert all(s <= e for s, e in enc.offsets)
    assert enc.ids == a.encode_ids(text) == a.encode_batch_ids([text])[0]
    assert len(a.tokens()) == 300
    path = tmp_path / "tok.json"
    a.save(path)
    c = load_tokenizer(path)
    assert c.fingerprint() == a.fingerprint() and c.eos_id == 0


def test_load_hf_directory_and_errors(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 280)
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    hf = load_tokenizer(d)
    assert hf.vocab_size == 280 and hf.eos_id == 0
    # megatron's GPTDataset reads these
    assert hf.eod == 0 and hf.unique_identifiers["vocab_size"] == 280
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(InputError, match="embedded:N"):
        load_tokenizer("embedded:many")
    with pytest.raises(InputError, match="at least 257"):
        train_bpe_tokenizer(TEXTS, 100)


# ---------------------------------------------------------------------------
# Embedded corpus
# ---------------------------------------------------------------------------


def test_stdlib_extraction_is_deterministic():
    files = stdlib_files(include=SUBSET)
    assert files == sorted(files) and "json/decoder.py" in files and "textwrap.py" in files
    assert not any("/test" in f for f in stdlib_files(include=["*test*"]))
    docs = documents_of_file(stdlib_root(), "json/__init__.py")
    ids = [d["id"] for d in docs]
    assert ids[0] == "json/__init__.py:<module>" and "json/__init__.py:dumps" in ids
    dumps = docs[ids.index("json/__init__.py:dumps")]["text"]
    assert dumps.startswith("def json.dumps(obj, *, skipkeys=False") and "JSON formatted" in dumps
    assert docs == documents_of_file(stdlib_root(), "json/__init__.py")
    assert len(set(ids)) == len(ids)
    # the split depends on the id only
    assert split_of("json/__init__.py:dumps") == split_of("json/__init__.py:dumps")
    splits = [split_of(f"doc{i}") for i in range(20000)]
    assert 0.015 < splits.count("valid") / 20000 < 0.025 and 0.015 < splits.count("test") / 20000 < 0.025


def test_embedded_subset_build_and_cache(subset, cache):
    corpus = subset.corpus
    manifest = corpus.manifest
    assert manifest["python"] and manifest["splits"]["train"]["documents"] > 50
    # rebuilding is a cache hit with identical files
    again = build_embedded_corpus(cache, include=SUBSET, progress=False)
    assert again.manifest == manifest
    rows = [json.loads(line) for line in open(corpus.jsonl["train"], encoding="utf-8")]
    assert all(split_of(r["id"]) == "train" for r in rows)
    tok = subset.tokenizer()
    assert tok.vocab_size == 400
    docs = read_documents(subset.prefixes["valid"])
    assert len(docs) == manifest["splits"]["valid"]["documents"]
    texts = list(corpus.texts("valid"))
    for doc, text in zip(docs, texts):
        assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == text


# ---------------------------------------------------------------------------
# Indexed datasets and `distill data prepare`
# ---------------------------------------------------------------------------


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    data_cli.add_parser(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_prepare_jsonl_trains_tokenizer_and_appends_eos(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    prefix = tmp_path / "out" / "ds"
    assert run_cli("data", "prepare", "--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(prefix),
                   "--text-key", "body", "--vocab-size", "300", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "wrote 60 documents" in out and "kind: indexed" in out
    tok = load_tokenizer(f"{prefix}.tokenizer.json")
    docs = read_documents(prefix)
    assert [tok.decode(d[:-1]) for d in docs] == TEXTS
    assert all(d[-1] == tok.eos_id for d in docs) and docs[0].dtype == np.uint16
    # an existing tokenizer is reused, plain text files are one document each
    (tmp_path / "a.txt").write_text("plain text file")
    assert run_cli("data", "prepare", "--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "t"),
                   "--tokenizer", f"{prefix}.tokenizer.json", "--no-progress") == 0
    assert tok.decode(read_documents(tmp_path / "t")[0][:-1]) == "plain text file"
    with pytest.raises(InputError, match="text_key|--text-key"):
        run_cli("data", "prepare", "--input", str(src), "--output-prefix", str(tmp_path / "x"),
                "--tokenizer", f"{prefix}.tokenizer.json")
    with pytest.raises(InputError, match="matches no file"):
        run_cli("data", "prepare", "--input", str(tmp_path / "nope*.jsonl"), "--output-prefix", "x", "--vocab-size", "300")
    with pytest.raises(InputError, match="--vocab-size"):
        run_cli("data", "prepare", "--input", str(src), "--output-prefix", "x")


def test_split_ranges():
    assert split_ranges(100, "98,1,1") == {"train": (0, 98), "valid": (98, 99), "test": (99, 100)}
    assert split_ranges(10, "8,2") == {"train": (0, 8), "valid": (8, 10), "test": (10, 10)}
    with pytest.raises(InputError, match="data.split"):
        split_ranges(10, "a,b")


# ---------------------------------------------------------------------------
# Iterators
# ---------------------------------------------------------------------------


def take(it, n):
    return [next(it) for _ in range(n)]


def check_batch(b, mbs, s):
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == b["position_ids"].shape == (mbs, s)
    assert b["tokens"].dtype == b["labels"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    # pre-shifted labels: labels[i] is the token after tokens[i]
    assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    assert torch.equal(b["position_ids"][0], torch.arange(s))


def dp_equivalence_and_resume(r, steps=3):
    """Same global batches for DP=1 and DP=2; resuming from consumed samples continues exactly."""
    gbs, mbs = r.training.global_batch_size, r.training.micro_batch_size
    one = build_data(r, dp_rank=0, dp_size=1)
    per_step_1 = [take(one, gbs // mbs) for _ in range(steps)]
    assert one.state_dict()["consumed_samples"] == steps * gbs
    two = [build_data(r, dp_rank=k, dp_size=2) for k in range(2)]
    for step in range(steps):
        rows1 = torch.cat([b["tokens"] for b in per_step_1[step]])
        ids1 = torch.cat([b["sample_ids"] for b in per_step_1[step]])
        mbs_per_rank = [take(two[k], gbs // (2 * mbs)) for k in range(2)]
        rows2 = torch.cat([b["tokens"] for k in range(2) for b in mbs_per_rank[k]])
        ids2 = torch.cat([b["sample_ids"] for k in range(2) for b in mbs_per_rank[k]])
        order1, order2 = torch.argsort(ids1), torch.argsort(ids2)
        assert torch.equal(ids1[order1], ids2[order2]) and torch.equal(rows1[order1], rows2[order2])
        check_batch(per_step_1[step][0], mbs, r.data.seq_length)
    resumed = build_data(r, dp_rank=0, dp_size=1, consumed_samples=2 * gbs)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(take(resumed, gbs // mbs), per_step_1[2]))
    state = one.state_dict()
    fresh = build_data(r, dp_rank=0, dp_size=1)
    fresh.load_state_dict(state)
    assert fresh.consumed_samples == steps * gbs


def test_synthetic_iterator():
    r = recipe(kind="synthetic", seq_length=16, student=ModelSpec(vocab_size=50))
    dp_equivalence_and_resume(r)
    b = next(build_data(r, dp_rank=0, dp_size=1))
    assert int(b["tokens"].max()) < 50
    ev = build_eval_data(r, dp_rank=0, dp_size=1)
    first, second = list(ev), list(ev)
    assert len(first) == 2 and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, second))
    assert not torch.equal(first[0]["tokens"], b["tokens"])  # validation differs from train
    with pytest.raises(InputError, match="vocab"):
        build_data(recipe(kind="synthetic"), dp_rank=0, dp_size=1)


def test_jsonl_iterator(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 300)
    tok.save(tmp_path / "tok.json")
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    r = recipe(kind="jsonl", paths=[str(src)], tokenizer=str(tmp_path / "tok.json"), seq_length=8, split="80,10,10")
    dp_equivalence_and_resume(r)
    # more steps than one epoch still works (reshuffled epochs)
    it = build_data(r, dp_rank=0, dp_size=1)
    n = it.source.num_samples
    seen = torch.cat([b["sample_ids"] for b in take(it, n)])
    assert torch.equal(seen, torch.arange(seen.numel()))
    list(build_eval_data(r, dp_rank=0, dp_size=1, split="test"))
    with pytest.raises(InputError, match="no valid documents|leaves no"):
        build_data(recipe(kind="jsonl", paths=[str(src)], tokenizer=str(tmp_path / "tok.json"), split="100,0,0"),
                   dp_rank=0, dp_size=1, split="valid")


def test_indexed_iterator_single_and_blend(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 300)
    tok.save(tmp_path / "tok.json")
    write_indexed_dataset(TEXTS, tok, tmp_path / "a", progress=False)
    write_indexed_dataset(TEXTS[::-1], tok, tmp_path / "b", progress=False)
    r = recipe(kind="indexed", paths=[str(tmp_path / "a")], tokenizer=str(tmp_path / "tok.json"), seq_length=16,
               split="80,10,10", output_dir=tmp_path)
    dp_equivalence_and_resume(r)
    it = build_data(r, dp_rank=0, dp_size=1)
    # every EOS-free piece of a sample is a contiguous run of some document
    # (GPTDataset shuffles the document order, then packs documents back to back)
    docs = [d[:-1].tolist() for d in read_documents(tmp_path / "a")]
    row = next(it)["tokens"][0].tolist()
    pieces, cur = [], []
    for t in row:
        if t == tok.eos_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    assert len(pieces) > 1  # short documents: a 16-token sample crosses a document boundary

    def inside(piece):
        return any(piece == d[i:i + len(piece)] for d in docs for i in range(len(d) - len(piece) + 1))

    assert all(inside(p) for p in pieces if p)
    # a weighted blend of two datasets
    rb = recipe(kind="indexed", paths=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[0.7, 0.3],
                tokenizer=str(tmp_path / "tok.json"), seq_length=16, split="80,10,10", output_dir=tmp_path)
    dp_equivalence_and_resume(rb)
    ev = list(build_eval_data(rb, dp_rank=0, dp_size=1))
    assert len(ev) == 2
    with pytest.raises(InputError, match="not found"):
        build_data(recipe(kind="indexed", paths=[str(tmp_path / "zzz")], output_dir=tmp_path), dp_rank=0, dp_size=1)


@pytest.mark.slow
def test_embedded_full_corpus_iterator(cache):
    """The whole stdlib corpus: several MB, default tokenizer, GPTDataset splits (about 15 s)."""
    r = recipe(kind="embedded", seq_length=64)
    tok = resolve_tokenizer(r)
    assert tok.name == "embedded:4096" and tok.vocab_size == 4096
    corpus = build_embedded_corpus(cache, progress=False)
    chars = sum(s["characters"] for s in corpus.manifest["splits"].values())
    assert chars > 1_500_000 and corpus.manifest["splits"]["valid"]["documents"] > 50
    it = build_data(r, dp_rank=0, dp_size=1)
    batches = take(it, 3)
    for b in batches:
        check_batch(b, 2, 64)
    text = tok.decode(batches[0]["tokens"][0])
    assert len(text) > 64  # BPE compresses: more characters than tokens
    ev = build_eval_data(r, dp_rank=0, dp_size=1)
    assert len(list(ev)) == 2
    resumed = build_data(r, dp_rank=0, dp_size=1, consumed_samples=4)
    assert torch.equal(next(resumed)["tokens"], batches[2]["tokens"])
