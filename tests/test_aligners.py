"""Vocabulary aligners on one process: exact token alignment, the data path, identity, ULD, ETA, DSKD maths.

Two real byte-level BPE tokenizers (vocabularies 300 and 500) are trained with
the ``tokenizers`` library on docstrings of a few standard-library modules,
which every machine running these tests has. Helpers at the top are shared
with tests/test_aligners_distributed.py and tests/test_aligners_training.py.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_plugins import build_objective, build_plugin_host
from distill_plugins.aligners import (
    AlignerInputs,
    DSKDAligner,
    ETAAligner,
    IdentityAligner,
    VocabMap,
    align_tokens,
    padded_vocab_size,
    projector_init,
    resolve_aligner_name,
    sorted_probability_distance,
)
from distill_plugins.aligners.vocab import byte_lengths, load_tokenizer, token_bytes
from distill_plugins.data.alignment_collate import AlignmentCollator, alignment_report, pair_rows
from distill_plugins.errors import RecipeError

STDLIB_MODULES = ("textwrap.py", "json/__init__.py", "json/decoder.py", "argparse.py", "string.py", "shlex.py",
                  "fractions.py", "heapq.py", "bisect.py", "difflib.py")
HELD_OUT_MODULES = ("calendar.py", "functools.py")
EOS = "<|endoftext|>"

TRICKY_TEXTS = [
    "Hello   world,  naïve café — 😀 emoji 🎉🎉 and CJK 漢字テスト.\n\n\tTabs\tand  double  spaces  ",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "   leading spaces, trailing newline\n",
    "a",
    "",
]


def docstrings(modules=STDLIB_MODULES) -> list[str]:
    """Docstrings of some stdlib modules (read with ast; nothing is imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in modules:
        if not (root / rel).is_file():  # module layout differs between Python versions
            continue
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc)
    return out


def train_bpe(vocab_size: int, texts: list[str], trim_offsets: bool = False):
    """A byte-level BPE with an end-of-text special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def corpus():
    return docstrings()


@pytest.fixture(scope="module")
def toks(corpus):
    """(student: 300 tokens, teacher: 500 tokens)."""
    return train_bpe(300, corpus), train_bpe(500, corpus)


@pytest.fixture(scope="module")
def tok_files(toks, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    paths = []
    for name, tok in zip(("s.json", "t.json"), toks):
        tok.save(str(d / name))
        paths.append(str(d / name))
    return paths


@pytest.fixture(scope="module")
def held_out():
    return docstrings(HELD_OUT_MODULES)[:40] + TRICKY_TEXTS


# ---------------------------------------------------------------------------
# exact token alignment
# ---------------------------------------------------------------------------


def _align(text, s_tok, t_tok, eos=False):
    es, et = s_tok.encode(text, add_special_tokens=False), t_tok.encode(text, add_special_tokens=False)
    s_ids, s_off, t_ids, t_off = list(es.ids), list(es.offsets), list(et.ids), list(et.offsets)
    if eos:
        s_ids, t_ids = s_ids + [0], t_ids + [0]
        s_off, t_off = s_off + [(len(text), len(text))], t_off + [(len(text), len(text))]
    al = align_tokens(text, s_ids, s_off, t_ids, t_off, student_byte_lengths=byte_lengths(s_tok),
                      teacher_byte_lengths=byte_lengths(t_tok), student_special_ids=[0], teacher_special_ids=[0],
                      student_eos_id=0 if eos else None, teacher_eos_id=0 if eos else None)
    return al, s_ids, t_ids


def _reference_pairs(s_ids, t_ids, s_tok, t_tok):
    """Brute force from token *bytes* (independent of offsets): same byte prefix and same next token."""
    def keyed(ids, tok):
        tb = _tb(tok)
        out, prefix = {}, b""
        for k, i in enumerate(ids):
            if k >= 1 and tb[i] is not None:
                out[(prefix, tb[i])] = k - 1
            prefix += tb[i] or b""
        return out

    ks, kt = keyed(s_ids, s_tok), keyed(t_ids, t_tok)
    return sorted((ks[k], kt[k]) for k in ks.keys() & kt.keys())


_TB: dict[int, list] = {}


def _tb(tok):
    if id(tok) not in _TB:
        _TB[id(tok)] = token_bytes(tok)
    return _TB[id(tok)]


def _prefix_bytes(tok, ids):
    tb = _tb(tok)
    return b"".join(tb[i] or b"" for i in ids)


def test_eta_pairs_are_exact_and_complete(toks, held_out):
    s_tok, t_tok = toks
    total_pairs = 0
    for text in held_out:
        al, s_ids, t_ids = _align(text, s_tok, t_tok)
        for n, (sp, tp) in enumerate(zip(al.student_pos.tolist(), al.teacher_pos.tolist())):
            if n % 7 == 0:  # decoding every prefix is quadratic; the byte checks below cover every pair
                assert s_tok.decode(s_ids[:sp + 1]) == t_tok.decode(t_ids[:tp + 1])
            prefix = _prefix_bytes(s_tok, s_ids[:sp + 1])
            assert prefix == _prefix_bytes(t_tok, t_ids[:tp + 1]) == text.encode()[:len(prefix)]
            assert s_tok.decode([s_ids[sp + 1]]) == t_tok.decode([t_ids[tp + 1]])
            assert _prefix_bytes(s_tok, [s_ids[sp + 1]]) == _prefix_bytes(t_tok, [t_ids[tp + 1]])
        # complete: every pair the byte-level brute force finds, nothing else
        got = list(zip(al.student_pos.tolist(), al.teacher_pos.tolist()))
        assert got == _reference_pairs(s_ids, t_ids, s_tok, t_tok)
        assert al.student_targets == max(len(s_ids) - 1, 0)
        total_pairs += al.num_aligned
    assert total_pairs > 1000


def test_eta_rejects_offsets_that_disagree_with_the_bytes(toks):
    """Offsets that do not match the token bytes (a normalizer, a buggy post-processor) give no pairs there."""
    s_tok, t_tok = toks
    text = "x 😀🎉 y and more text"
    es, et = s_tok.encode(text, add_special_tokens=False), t_tok.encode(text, add_special_tokens=False)
    good = align_tokens(text, es.ids, es.offsets, et.ids, et.offsets, student_byte_lengths=byte_lengths(s_tok),
                        teacher_byte_lengths=byte_lengths(t_tok))
    assert good.num_aligned >= 4
    lying = [(a, b + 1 if 2 <= k < 5 else b) for k, (a, b) in enumerate(es.offsets)]  # ends moved by a char
    bad = align_tokens(text, es.ids, lying, et.ids, et.offsets, student_byte_lengths=byte_lengths(s_tok),
                       teacher_byte_lengths=byte_lengths(t_tok))
    moved_targets = {k for k in range(2, 6)}
    assert not set((bad.student_pos + 1).tolist()) & moved_targets
    assert set(bad.student_pos.tolist()) <= set(good.student_pos.tolist())


def test_identical_tokenizers_align_every_position(toks, held_out):
    s_tok, _ = toks
    for text in held_out[:20] + TRICKY_TEXTS[:3]:
        for eos in (False, True):
            al, s_ids, _ = _align(text, s_tok, s_tok, eos=eos)
            n = len(s_ids) - 1
            assert al.coverage == 1.0 and al.num_aligned == n
            assert (al.student_pos == np.arange(n)).all() and (al.teacher_pos == al.student_pos).all()


def test_eos_pairs_at_end_of_text(toks):
    s_tok, t_tok = toks
    al, s_ids, t_ids = _align("The end.", s_tok, t_tok, eos=True)
    assert (len(s_ids) - 2, len(t_ids) - 2) in set(zip(al.student_pos.tolist(), al.teacher_pos.tolist()))


def test_trimmed_offsets_do_not_create_false_pairs(corpus, toks, held_out):
    """A post-processor that trims offsets moves boundaries; pairs must stay exact."""
    s_trim = train_bpe(300, corpus, trim_offsets=True)
    _, t_tok = toks
    assert s_trim.encode(" a  b").offsets != toks[0].encode(" a  b").offsets
    for text in held_out[:10] + TRICKY_TEXTS:
        al, s_ids, t_ids = _align(text, s_trim, t_tok)
        for sp, tp in zip(al.student_pos.tolist(), al.teacher_pos.tolist()):
            assert s_trim.decode(s_ids[:sp + 1]) == t_tok.decode(t_ids[:tp + 1])
            assert s_trim.decode([s_ids[sp + 1]]) == t_tok.decode([t_ids[tp + 1]])


def test_load_tokenizer_untrims_offsets(corpus, tmp_path):
    tok = train_bpe(300, corpus, trim_offsets=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (str(tmp_path / "tokenizer.json"), str(tmp_path)):  # file and HF-style directory
        loaded = load_tokenizer(path)
        assert json.loads(loaded.to_str())["post_processor"]["trim_offsets"] is False
        enc = loaded.encode("a  b\n  c", add_special_tokens=False)
        ends = [e for _, e in enc.offsets]
        starts = [s for s, _ in enc.offsets]
        assert starts[1:] == ends[:-1]  # contiguous, as the text


def test_alignment_is_fast_enough_for_a_data_loader(toks, corpus):
    import time

    s_tok, t_tok = toks
    text = "\n\n".join(corpus)[:20000]
    t0 = time.perf_counter()
    al, _, _ = _align(text, s_tok, t_tok)
    assert time.perf_counter() - t0 < 0.5
    assert 0.2 < al.coverage < 1.0


def test_vocab_map_pairs_equal_bytes(toks):
    s_tok, t_tok = toks
    vm = VocabMap.from_tokenizers(s_tok, t_tok)
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    assert vm.size >= 290  # BPE merges of the smaller vocabulary are mostly in the larger one
    for s, t in zip(vm.student_ids.tolist(), vm.teacher_ids.tolist()):
        assert sb[s] == tb[t] and sb[s] is not None
    assert 0 not in vm.student_ids.tolist()  # the special token is excluded
    t2s = vm.teacher_to_student()
    assert t2s.shape == (500,) and (t2s[vm.teacher_ids] == vm.student_ids).all()


# ---------------------------------------------------------------------------
# data path
# ---------------------------------------------------------------------------


def test_collate_carries_both_tokenizations_and_alignment(toks, tok_files, held_out):
    s_tok, t_tok = toks
    texts = held_out[:6] + TRICKY_TEXTS
    collate = AlignmentCollator(tok_files[0], tok_files[1], seq_length=48, teacher_seq_length=64)
    batch = collate(texts)
    b = len(texts)
    assert batch["student_tokens"].shape == (b, 48) and batch["teacher_tokens"].shape == (b, 64)
    assert batch["student_label_offsets"].shape == (b, 48, 2)
    s_rows, t_rows = pair_rows(batch)
    assert s_rows.numel() == int(batch["num_aligned"]) > 0
    s_lab, t_lab = batch["student_labels"].reshape(-1), batch["teacher_labels"].reshape(-1)
    s_off = batch["student_label_offsets"].reshape(-1, 2)
    t_off = batch["teacher_label_offsets"].reshape(-1, 2)
    for s, t in zip(s_rows.tolist(), t_rows.tolist()):
        assert s_lab[s] != -100 and t_lab[t] != -100
        if s_lab[s] != 0:  # text tokens: same span, same text; EOS pairs carry (len, len)
            assert torch.equal(s_off[s], t_off[t])
            assert s_tok.decode([int(s_lab[s])]) == t_tok.decode([int(t_lab[t])])
    for row in range(b):  # inputs followed by labels form the tokenization
        n = int((batch["student_labels"][row] != -100).sum())
        ids = batch["student_tokens"][row, :n].tolist()
        assert batch["student_labels"][row, :max(n - 1, 0)].tolist() == ids[1:n]
    rep = alignment_report(batch)
    assert 0 < rep["coverage"] < 1 and rep["student_targets"] == float((batch["student_labels"] != -100).sum())
    # the megatron layout [L, B] gives the same pairs
    s_sb, t_sb = pair_rows(batch, layout="sb")
    assert torch.equal(s_lab[s_rows], batch["student_labels"].T.reshape(-1)[s_sb])
    assert torch.equal(t_lab[t_rows], batch["teacher_labels"].T.reshape(-1)[t_sb])


def test_collate_teacher_covers_the_students_text(toks, tok_files, held_out):
    collate = AlignmentCollator(tok_files[0], tok_files[1], seq_length=32, teacher_seq_length=64)
    batch = collate(held_out[:8])
    for row in range(8):
        s_end = batch["student_label_offsets"][row, :, 1].max()
        t_end = batch["teacher_label_offsets"][row, :, 1].max()
        assert t_end <= s_end  # the teacher never sees text past the student's window
        assert t_end >= s_end - 8


def test_collate_same_tokenizer_aligns_everything(tok_files, held_out):
    batch = AlignmentCollator(tok_files[0], seq_length=40)(held_out[:4])
    assert int(batch["num_aligned"]) == int(batch["num_student_targets"])
    pos = torch.arange(40).expand(4, 40)
    mask = batch["aligned_mask"]
    assert torch.equal(batch["align_teacher_pos"][mask], pos[mask])


def test_collate_positional_pairing(tok_files, held_out):
    batch = AlignmentCollator(tok_files[0], tok_files[1], seq_length=16, teacher_seq_length=16,
                              pairing="position")(held_out[:3])
    mask = batch["aligned_mask"]
    assert torch.equal(batch["align_teacher_pos"][mask], torch.arange(16).expand(3, 16)[mask])


# ---------------------------------------------------------------------------
# identity and auto
# ---------------------------------------------------------------------------


def test_identity_check_refuses_different_real_vocabularies():
    errors = IdentityAligner().check(student_vocab_size=300, teacher_vocab_size=500)
    assert len(errors) == 1
    assert "300" in errors[0] and "500" in errors[0] and "dskd" in errors[0]
    assert IdentityAligner().check(student_vocab_size=300, teacher_vocab_size=300) == []


def test_identity_check_compares_tokenizer_files(tok_files, corpus, tmp_path):
    other = train_bpe(300, corpus[::-1][:60])  # same size, different merges
    other.save(str(tmp_path / "o.json"))
    errors = IdentityAligner().check(student_vocab_size=300, teacher_vocab_size=300,
                                     student_tokenizer=tok_files[0], teacher_tokenizer=str(tmp_path / "o.json"))
    assert errors and "different ids" in errors[0]


def _recipe(tok_files, aligner, **extra):
    from distill_plugins.recipe.validate import validate_recipe_data

    data = {"data": {"kind": "jsonl", "paths": ["x.jsonl"], "tokenizer": tok_files[0],
                     "teacher_tokenizer": tok_files[1]}, "aligner": aligner, "device": "cpu", **extra}
    return validate_recipe_data(data)


def test_identity_fails_at_check_time_in_a_recipe(tok_files):
    with pytest.raises(RecipeError) as err:
        _recipe(tok_files, "identity")
    msg = str(err.value)
    assert "aligner" in msg and "300" in msg and "500" in msg and "cross-tokenizer" in msg
    recipe, _ = _recipe(tok_files, {"name": "dskd", "objective": "reverse_kl"})
    assert recipe.aligner.params == {"objective": "reverse_kl"}


def test_cross_tokenizer_recipe_checks(tok_files):
    with pytest.raises(RecipeError) as err:
        _recipe(tok_files, {"name": "dskd", "objective": "no_such_loss"})
    assert "no_such_loss" in str(err.value)
    with pytest.raises(RecipeError) as err:
        _recipe(tok_files, "eta", data={"kind": "indexed", "paths": ["p"], "tokenizer": tok_files[0],
                                        "teacher_tokenizer": tok_files[1]})
    assert "raw text" in str(err.value)


def test_resolve_auto(tok_files, tmp_path):
    assert resolve_aligner_name(tok_files[0], None, 300, 300) == "identity"
    assert resolve_aligner_name(tok_files[0], tok_files[0], 300, 300) == "identity"
    assert resolve_aligner_name(tok_files[0], tok_files[1], 300, 500) == "dskd"
    assert resolve_aligner_name(None, None, 300, 512) == "dskd"
    copy = tmp_path / "copy.json"
    copy.write_text(Path(tok_files[0]).read_text())
    assert resolve_aligner_name(tok_files[0], str(copy), 300, 300) == "identity"


def test_identity_padding_rule():
    assert padded_vocab_size(300, 128, 2) == 512 and padded_vocab_size(256, 128, 1) == 256
    ident = IdentityAligner()
    teacher = torch.randn(5, 320)
    out = ident.teacher_logits_like_student(teacher, 384, None, vocab_size=300)
    assert out.shape == (5, 384) and torch.equal(out[:, :300], teacher[:, :300])
    assert ident.teacher_logits_like_student(teacher, 320) is teacher


def test_registered_names():
    host = build_plugin_host(entry_points=False)
    assert {"identity", "eta", "dskd", "uld"} <= set(host.names("vocab_aligner"))
    part = host.build("vocab_aligner", "dskd", {"objective": {"name": "skew_kl"}, "t2s_ce_target": "gold"})
    assert part.objective_name_and_params() == ("skew_kl", {})
    with pytest.raises(RecipeError):
        host.build("vocab_aligner", "dskd", {"objective": {"alpha": 0.1}})


# ---------------------------------------------------------------------------
# losses at TP=1
# ---------------------------------------------------------------------------


def test_uld_matches_numpy_sorting():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(7, 12, generator=g, requires_grad=True)
    zt = torch.randn(7, 20, generator=g)
    got = sorted_probability_distance(zs, zt, temperature=2.0, student_vocab_size=10, teacher_vocab_size=17)
    q = np.sort(torch.softmax(zs[:, :10] / 2, -1).detach().numpy(), -1)[:, ::-1]
    p = np.sort(torch.softmax(zt[:, :17] / 2, -1).numpy(), -1)[:, ::-1]
    q = np.pad(q, ((0, 0), (0, 7)))
    assert np.allclose(got.detach().numpy(), np.abs(q - p).sum(-1), atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(zs.grad).all() and zs.grad[:, 10:].abs().max() == 0
    topk = sorted_probability_distance(zs, zt, student_vocab_size=10, teacher_vocab_size=17, top_k=4)
    exact = sorted_probability_distance(zs, zt, student_vocab_size=10, teacher_vocab_size=17)
    assert (topk <= exact + 1e-6).all() and (topk > 0).all()


def test_eta_aligner_is_kl_over_shared_tokens(toks):
    s_tok, t_tok = toks
    eta = ETAAligner()
    eta.setup(student_tokenizer=s_tok, teacher_tokenizer=t_tok, objective=build_objective("forward_kl"))
    vm = eta.vocab_map
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(6, 304, generator=g, requires_grad=True)
    zt = torch.randn(9, 512, generator=g)
    pairs = (torch.tensor([0, 2, 5]), torch.tensor([8, 1, 3]))
    out = eta.loss(AlignerInputs(student_logits=zs, teacher_logits=zt, pairs=pairs, student_vocab_size=300,
                                 teacher_vocab_size=500))
    ls = torch.log_softmax(zs[pairs[0]][:, vm.student_ids], -1)
    lt = torch.log_softmax(zt[pairs[1]][:, vm.teacher_ids], -1)
    want = (lt.exp() * (lt - ls)).sum()
    assert out.num_tokens == 3 and torch.allclose(out.loss_sum, want, atol=1e-5)
    out.loss_sum.backward()
    unshared = torch.ones(304, dtype=torch.bool)
    unshared[vm.student_ids] = False
    assert zs.grad[:, unshared].abs().max() == 0


def test_dskd_pinv_init_recovers_an_exact_map():
    """If W_t = W_s M (same vocabulary), the init gives P_t2s = M and z_t2s = z_t."""
    g = torch.Generator().manual_seed(2)
    v, d_s, d_t = 50, 8, 6
    ws = torch.randn(v + 6, d_s, generator=g)  # 6 padding rows of garbage
    m = torch.randn(d_s, d_t, generator=g)
    wt = ws @ m
    wt[v:] = 100.0
    t2s, s2t = projector_init(ws, wt, student_vocab_size=v, teacher_vocab_size=v, ridge=1e-12)
    assert torch.allclose(t2s, m.double(), atol=1e-6)
    h_t = torch.randn(4, d_t, generator=g).double()
    assert torch.allclose(h_t @ t2s.T @ ws[:v].double().T, h_t @ wt[:v].double().T, atol=1e-5)
    # s2t is the least-squares inverse direction: W_t P_s2t ~= W_s over the real rows
    resid = wt[:v].double() @ s2t - ws[:v].double()
    best = torch.linalg.lstsq(wt[:v].double(), ws[:v].double()).solution
    assert resid.norm() <= (wt[:v].double() @ best - ws[:v].double()).norm() * (1 + 1e-6)


def test_dskd_terms_on_one_rank(toks):
    s_tok, t_tok = toks
    dskd = DSKDAligner(DSKDAligner.Config(objective="forward_kl"))
    dskd.setup(student_tokenizer=s_tok, teacher_tokenizer=t_tok, objective=build_objective("forward_kl"))
    g = torch.Generator().manual_seed(3)
    ws, wt = torch.randn(304, 16, generator=g) * 0.3, torch.randn(512, 24, generator=g) * 0.3
    dskd.build_projectors(16, 24)
    dskd.init_projectors(ws, wt, student_vocab_size=300, teacher_vocab_size=500)
    assert [m for m in dskd.trainable_modules()] == [dskd.projectors]
    hs = torch.randn(10, 16, generator=g, requires_grad=True)
    ht = torch.randn(12, 24, generator=g)
    labels = torch.randint(1, 300, (10,), generator=g)
    labels[4] = -100
    inputs = AlignerInputs(student_logits=hs @ ws.T, teacher_logits=ht @ wt.T, pairs=(torch.arange(6),
                           torch.tensor([0, 2, 4, 6, 8, 10])), student_labels=labels, student_hidden=hs,
                           teacher_hidden=ht, student_head_weight=ws, teacher_head_weight=wt,
                           student_vocab_size=300, teacher_vocab_size=500)
    out = dskd.loss(inputs)
    assert out.num_tokens == 5 and out.report["aligned"] == 5.0 and out.report["coverage"] == 5 / 9
    assert set(out.terms) == {"t2s_ce", "t2s_kd", "s2t_kd"} and torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert dskd.projectors.t2s.weight.grad.abs().sum() > 0 and dskd.projectors.s2t.weight.grad.abs().sum() > 0
    assert hs.grad[6:].abs().max() == 0 and hs.grad[:4].abs().sum() > 0
    # a microbatch without aligned tokens: zero loss, zero count, gradients defined (zero)
    inputs.pairs = (torch.tensor([4]), torch.tensor([0]))  # its student label is -100
    inputs.student_logits = hs @ ws.T
    empty = dskd.loss(inputs)
    assert empty.num_tokens == 0 and empty.loss_sum.item() == 0.0 and empty.report["coverage"] == 0.0
    dskd.projectors.zero_grad()
    empty.loss_sum.backward()
    assert dskd.projectors.t2s.weight.grad.abs().max() == 0
