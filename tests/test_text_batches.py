"""Cross-tokenizer microbatches from raw text (distill_plugins/data/text_batches.py), on one process.

Two real byte-level BPE tokenizers (student 300 tokens, teacher 500) are
trained on standard-library docstrings and saved as tokenizer JSON files; the
same docstrings, one per JSONL line, are the corpus. One test builds the
embedded corpus and two ``embedded:N`` tokenizers in a temporary cache (about
10 s on one core).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill_plugins.data.alignment_collate import AlignmentCollator
from distill_plugins.data.sources import expand_inputs, iter_texts, split_ranges
from distill_plugins.data.text_batches import (
    AlignedMicrobatchIterator,
    PackedTextSource,
    build_aligned_data,
    build_aligned_eval_data,
    text_documents,
)
from distill_plugins.data.tokenizer import load_tokenizer
from distill_plugins.errors import InputError
from distill_plugins.recipe.schema import DataSpec, ModelSpec, PartSpec, Recipe, TrainingSpec
from test_aligners import docstrings, train_bpe

SEQ = 32
COLLATOR_KEYS = {"student_tokens", "student_labels", "student_label_offsets", "teacher_tokens", "teacher_labels",
                 "teacher_label_offsets", "align_teacher_pos", "aligned_mask", "num_student_targets", "num_aligned"}
ENGINE_KEYS = {"tokens", "labels", "loss_mask", "position_ids", "sample_ids"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Directory with student.json (BPE 300), teacher.json (BPE 500) and corpus.jsonl (docstrings + blanks)."""
    root = tmp_path_factory.mktemp("text_batches")
    texts = docstrings()
    train_bpe(300, texts).save(str(root / "student.json"))
    train_bpe(500, texts).save(str(root / "teacher.json"))
    rows = texts[:50] + ["   ", ""] + texts[50:]  # blank documents are dropped by the packer
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return root


def _recipe(root, *, micro_batch_size: int = 2, **data) -> Recipe:
    spec = dict(kind="jsonl", paths=[str(root / "corpus.jsonl")], tokenizer=str(root / "student.json"),
                teacher_tokenizer=str(root / "teacher.json"), seq_length=SEQ, split="90,5,5")
    spec.update(data)
    return Recipe(
        student=ModelSpec(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300,
                          max_position_embeddings=64),
        teacher=ModelSpec(arch="gpt2", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=500,
                          max_position_embeddings=64),
        data=DataSpec(**spec),
        training=TrainingSpec(steps=10, micro_batch_size=micro_batch_size, global_batch_size=4, eval_batches=3),
        aligner=PartSpec(name="eta"), device="cpu", seed=7, output_dir=str(root / "run"),
    )


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------
# Documents and packing
# ---------------------------------------------------------------------------


def test_jsonl_documents_match_the_token_id_split(files):
    recipe = _recipe(files)
    every = [t for f in expand_inputs(recipe.data.paths) for t in iter_texts(f)]
    ranges = split_ranges(len(every), recipe.data.split)
    splits = {s: text_documents(recipe, s) for s in ("train", "valid", "test")}
    for split, (lo, hi) in ranges.items():
        assert splits[split] == every[lo:hi]  # the ranges jsonl_source uses
    assert sum(len(d) for d in splits.values()) == len(every)


def _stream_ids(src: PackedTextSource, tok) -> np.ndarray:
    """The split's student token stream: each document with the separator before it, tokenized."""
    pieces = src.documents[:1] + ["\n\n" + d for d in src.documents[1:]]
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(pieces,
                                                                                         add_special_tokens=False)])


def test_windows_walk_whole_documents(files):
    """Consecutive windows of SEQ student tokens cover the split's token stream end to end, each once per epoch."""
    recipe = _recipe(files)
    it = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    src, collator = it.source, it.collator
    backend = collator.student.backend
    assert "   " not in src.documents and "" not in src.documents  # blank documents dropped
    ids = _stream_ids(src, backend)
    assert src.num_tokens == ids.size and src.num_windows == ids.size // SEQ > 50
    inputs, labels = [], []
    for k0 in range(0, src.num_windows, 64):  # every window, collated 64 at a time
        batch = collator([src.window(k) for k in range(k0, min(k0 + 64, src.num_windows))])
        inputs.append(batch["student_tokens"].reshape(-1))
        labels.append(batch["student_labels"].reshape(-1))
    inputs, labels = torch.cat(inputs).numpy(), torch.cat(labels).numpy()
    n = src.num_windows * SEQ
    assert np.array_equal(inputs, ids[:n])  # window k holds stream tokens [k*s, k*s + s): nothing skipped
    assert np.array_equal(labels[:-1], ids[1:n])  # pre-shifted next tokens, across window boundaries too
    assert ids.size - n < SEQ  # only the split's last tokens (< one window) are left out
    # the longest document is trained on from its first token to its last
    longest = max(src.documents, key=len)
    assert len(backend.encode(longest, add_special_tokens=False).ids) > 3 * SEQ
    # one epoch: each window exactly once, in a seeded order; the next epoch reshuffles
    w = src.num_windows
    first = [src.sample(i) for i in range(w)]
    assert sorted(first) == sorted(src.window(k) for k in range(w))
    order = np.random.default_rng([7, 0, 1]).permutation(w)
    assert [src.sample(w + j) for j in range(3)] == [src.window(int(k)) for k in order[:3]]
    with pytest.raises(InputError, match="no non-blank documents"):
        PackedTextSource(["", " \n"], seed=0, split="test", tokenizer=backend, seq_length=SEQ)


def test_last_window_ends_the_stream_with_eos(files):
    """A split shorter than a window is one sample: the whole text, then EOS, then padding."""
    recipe = _recipe(files)
    collator = build_aligned_data(recipe, dp_rank=0, dp_size=1).collator
    src = PackedTextSource(["def f(x):", "return x"], seed=0, split="valid", tokenizer=collator.student.backend,
                           seq_length=SEQ)
    assert src.num_windows == 1 and src.sample(0) == src.sample(1) == "def f(x):\n\nreturn x"
    row = collator([src.sample(0)])
    ids = _stream_ids(src, collator.student.backend)
    valid = row["student_labels"][0] != -100
    assert row["student_labels"][0][valid].tolist() == ids[1:].tolist() + [collator.student.eos_id]


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def test_batch_keys_shapes_and_labels(files):
    it = build_aligned_data(_recipe(files), dp_rank=0, dp_size=1)
    assert isinstance(it, AlignedMicrobatchIterator)
    for k, batch in enumerate(_take(it, 3)):
        assert COLLATOR_KEYS | ENGINE_KEYS <= batch.keys()
        for key in ("tokens", "labels", "position_ids", "student_tokens", "teacher_tokens", "align_teacher_pos"):
            assert batch[key].shape == (2, SEQ) and batch[key].dtype == torch.int64, key
        assert batch["loss_mask"].shape == (2, SEQ) and batch["loss_mask"].dtype == torch.float32
        assert batch["student_label_offsets"].shape == (2, SEQ, 2)
        assert batch["aligned_mask"].dtype == torch.bool
        assert batch["sample_ids"].tolist() == [2 * k, 2 * k + 1]
        assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(2, SEQ))
        assert torch.equal(batch["tokens"], batch["student_tokens"])
        assert torch.equal(batch["labels"], batch["student_labels"])
        labels, tokens = batch["labels"], batch["tokens"]
        assert torch.equal(batch["loss_mask"], (labels != -100).float())
        assert bool((labels != -100).all())  # packed documents fill the window
        both = (labels[:, :-1] != -100)
        assert torch.equal(labels[:, :-1][both], tokens[:, 1:][both])  # pre-shifted: label i is token i+1
        t_lab, t_tok = batch["teacher_labels"], batch["teacher_tokens"]
        t_both = t_lab[:, :-1] != -100
        assert torch.equal(t_lab[:, :-1][t_both], t_tok[:, 1:][t_both])
        assert int(batch["num_student_targets"]) == int((labels != -100).sum())
        assert int(batch["num_aligned"]) == int(batch["aligned_mask"].sum()) > 0


def test_aligned_pairs_cover_the_same_text(files):
    recipe = _recipe(files)
    it = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    s_tok, t_tok = load_tokenizer(recipe.data.tokenizer), load_tokenizer(recipe.data.teacher_tokenizer)
    checked = 0
    for batch in _take(it, 2):
        for row, sample in enumerate(batch["sample_ids"].tolist()):
            text = it.source.sample(sample)
            for s in batch["aligned_mask"][row].nonzero().flatten().tolist():
                t = int(batch["align_teacher_pos"][row, s])
                s_end = int(batch["student_label_offsets"][row, s, 1])
                assert s_end == int(batch["teacher_label_offsets"][row, t, 1])
                assert int(batch["student_label_offsets"][row, s, 0]) == int(batch["teacher_label_offsets"][row, t, 0])
                s_text = s_tok.decode(batch["student_tokens"][row, :s + 1].tolist() + [int(batch["labels"][row, s])])
                t_text = t_tok.decode(batch["teacher_tokens"][row, :t + 1].tolist()
                                      + [int(batch["teacher_labels"][row, t])])
                assert s_text == t_text == text[:s_end]
                checked += 1
    assert checked > 20


def test_same_tokenizer_aligns_every_position(files):
    recipe = _recipe(files, teacher_tokenizer=None)
    for batch in _take(build_aligned_data(recipe, dp_rank=0, dp_size=1), 2):
        valid = batch["labels"] != -100
        assert torch.equal(batch["aligned_mask"], valid)
        assert torch.equal(batch["align_teacher_pos"][valid], torch.arange(SEQ).expand(2, SEQ)[valid])
        assert torch.equal(batch["teacher_tokens"], batch["tokens"])


def test_position_pairing_for_uld(files):
    batch = next(build_aligned_data(_recipe(files), dp_rank=0, dp_size=1, pairing="position"))
    # the k-th target of each side, for k below both target counts (the teacher keeps the student's text only)
    both = torch.minimum((batch["labels"] != -100).sum(1), (batch["teacher_labels"] != -100).sum(1))
    pos = torch.arange(SEQ).expand(2, SEQ)
    assert torch.equal(batch["align_teacher_pos"], torch.where(pos < both[:, None], pos, -1))
    assert int(both.min()) > 0


# ---------------------------------------------------------------------------
# Order, data parallelism, resumption
# ---------------------------------------------------------------------------


def test_deterministic(files):
    recipe = _recipe(files)
    a = _take(build_aligned_data(recipe, dp_rank=0, dp_size=1), 4)
    b = _take(build_aligned_data(recipe, dp_rank=0, dp_size=1), 4)
    for x, y in zip(a, b):
        _assert_same(x, y)
    assert not torch.equal(a[0]["tokens"], a[1]["tokens"])


def test_resume_is_exact(files):
    recipe = _recipe(files)
    straight = _take(build_aligned_data(recipe, dp_rank=0, dp_size=1), 4)
    first = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    _take(first, 3)
    state = first.state_dict()
    assert state == {"consumed_samples": 6, "kind": "jsonl", "split": "train", "stream": "text"}
    resumed = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    _assert_same(next(resumed), straight[3])
    _assert_same(next(build_aligned_data(recipe, dp_rank=0, dp_size=1, consumed_samples=6)), straight[3])
    with pytest.raises(InputError, match="data.kind='embedded'"):
        resumed.load_state_dict({**state, "kind": "embedded"})
    # a checkpoint of the token-id path (another aligner) does not silently resume a text stream, nor back
    with pytest.raises(InputError, match="token-id batches"):
        resumed.load_state_dict({"consumed_samples": 6, "kind": "jsonl", "split": "train"})
    from distill_plugins.data.iterators import build_data

    with pytest.raises(InputError, match="raw-text batches"):
        build_data(recipe, dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        build_aligned_data(recipe, dp_rank=0, dp_size=1, consumed_samples=3)


def test_prefetching_changes_no_batch(files):
    """The background thread builds the next microbatch; values, order and resumption are unchanged."""
    recipe = _recipe(files)
    plain = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    plain.prefetch = False
    expected = _take(plain, 5)
    fetched = build_aligned_data(recipe, dp_rank=0, dp_size=1)
    assert fetched.prefetch
    got = _take(fetched, 3)
    assert fetched._pending is not None and fetched._pending[0] == 6  # samples 6, 7 are being built
    fetched.load_state_dict({"consumed_samples": 2, "kind": "jsonl", "stream": "text"})  # the prefetch is stale
    got += _take(fetched, 2)
    for a, b in zip(got, expected[:3] + expected[1:3]):
        _assert_same(a, b)


def test_resume_past_an_epoch(files):
    recipe = _recipe(files, split="90,9,1")  # a small valid split: epoch 1 starts early
    it = build_aligned_data(recipe, dp_rank=0, dp_size=1, split="valid")
    n = it.source.num_windows
    start = (n // 2 + 1) * 2  # the first microbatch boundary past one epoch
    a = next(build_aligned_data(recipe, dp_rank=0, dp_size=1, split="valid", consumed_samples=start))
    assert a["sample_ids"].tolist() == [start, start + 1] and start >= n
    it.load_state_dict({"consumed_samples": start, "kind": "jsonl", "stream": "text"})
    _assert_same(next(it), a)


def test_data_parallel_ranks_split_the_stream(files):
    recipe = _recipe(files)
    single = _take(build_aligned_data(recipe, dp_rank=0, dp_size=1), 4)
    ranks = [_take(build_aligned_data(recipe, dp_rank=r, dp_size=2), 2) for r in (0, 1)]
    assert [b["sample_ids"].tolist() for b in ranks[0]] == [[0, 1], [4, 5]]
    assert [b["sample_ids"].tolist() for b in ranks[1]] == [[2, 3], [6, 7]]
    by_sample = {int(i): b["tokens"][row] for b in single for row, i in enumerate(b["sample_ids"])}
    seen = [int(i) for r in ranks for b in r for i in b["sample_ids"]]
    assert sorted(seen) == sorted(by_sample) and len(set(seen)) == len(seen)
    for r in ranks:
        for b in r:
            for row, i in enumerate(b["sample_ids"].tolist()):
                assert torch.equal(b["tokens"][row], by_sample[i])


def test_eval_data_is_reiterable(files):
    recipe = _recipe(files)
    held_out = build_aligned_eval_data(recipe, dp_rank=0, dp_size=1)
    assert len(held_out) == 3
    a, b = list(held_out), list(held_out)
    assert len(a) == 3 and [x["sample_ids"].tolist() for x in a] == [[0, 1], [2, 3], [4, 5]]
    for x, y in zip(a, b):
        _assert_same(x, y)
    train = next(build_aligned_data(recipe, dp_rank=0, dp_size=1))
    assert not torch.equal(a[0]["tokens"], train["tokens"])  # a different split
    assert len(list(build_aligned_eval_data(recipe, dp_rank=1, dp_size=2, split="test", num_microbatches=2))) == 2


# ---------------------------------------------------------------------------
# Errors and the embedded corpus
# ---------------------------------------------------------------------------


def test_clear_errors(files):
    with pytest.raises(InputError, match=r"data.kind='synthetic'.*jsonl or embedded"):
        build_aligned_data(_recipe(files, kind="synthetic", paths=[]), dp_rank=0, dp_size=1)
    with pytest.raises(InputError, match="data.tokenizer"):
        build_aligned_data(_recipe(files, tokenizer=None, teacher_tokenizer=None), dp_rank=0, dp_size=1)
    with pytest.raises(InputError, match="data.teacher_tokenizer.*missing.json"):
        build_aligned_data(_recipe(files, teacher_tokenizer=str(files / "missing.json")), dp_rank=0, dp_size=1)
    with pytest.raises(InputError, match=r"valid split is empty.*data.split='100,0,0'"):
        build_aligned_eval_data(_recipe(files, split="100,0,0"), dp_rank=0, dp_size=1)
    with pytest.raises(InputError, match="pairing='nope'"):
        build_aligned_data(_recipe(files), dp_rank=0, dp_size=1, pairing="nope")
    with pytest.raises(ValueError, match="split='dev'"):
        build_aligned_data(_recipe(files), dp_rank=0, dp_size=1, split="dev")


def test_embedded_corpus_and_embedded_tokenizers(files, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    recipe = _recipe(files, kind="embedded", paths=[], tokenizer="embedded:300", teacher_tokenizer="embedded:400")
    docs = text_documents(recipe, "valid")
    assert docs and all(isinstance(d, str) for d in docs)
    held_out = build_aligned_eval_data(recipe, dp_rank=0, dp_size=1, num_microbatches=1)
    batch = next(iter(held_out))
    assert batch["tokens"].shape == (2, SEQ) and int(batch["num_aligned"]) > 0
    assert isinstance(iter(held_out).collator, AlignmentCollator)
    assert iter(held_out).state_dict()["kind"] == "embedded"


def test_hugging_face_tokenizer_directory_gives_the_same_batches(files, tmp_path):
    """data.teacher_tokenizer may be a HF tokenizer directory (save_pretrained of a fast tokenizer)."""
    transformers = pytest.importorskip("transformers")  # the `test` extra installs it
    from tokenizers import Tokenizer as RustTokenizer

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_file(str(files / "teacher.json")),
                                              eos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "teacher_hf"))
    from_json = _take(build_aligned_data(_recipe(files), dp_rank=0, dp_size=1), 2)
    from_dir = _take(build_aligned_data(_recipe(files, teacher_tokenizer=str(tmp_path / "teacher_hf")),
                                        dp_rank=0, dp_size=1), 2)
    for a, b in zip(from_json, from_dir):
        _assert_same(a, b)
    assert load_tokenizer(tmp_path / "teacher_hf").eos_id == hf.eos_token_id
