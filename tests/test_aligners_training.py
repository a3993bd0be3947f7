"""A short CPU run: distil a teacher of one tokenizer into a student of another.

Plain torch, no megatron: two tiny GRU language models over two real
byte-level BPE tokenizers (teacher 500 tokens, student 300). The teacher is
first trained with cross-entropy; the student then learns from the teacher
only (the aligner's loss with exact token alignment, no cross-entropy on
labels), with batches from :class:`AlignmentCollator`. Its held-out
cross-entropy on its own tokenization must fall well below where it started. This is the
same call sequence the engine makes (see docs/aligners.md, "Engine API").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_plugins import build_plugin_host
from distill_plugins.aligners import AlignerInputs
from distill_plugins.data.alignment_collate import AlignmentCollator, alignment_report, pair_rows
from test_aligners import HELD_OUT_MODULES, docstrings, train_bpe

SEQ_S, SEQ_T, BATCH = 48, 64, 16
TRAIN_MODULES = ("textwrap.py", "json/__init__.py", "json/decoder.py", "argparse.py", "string.py", "shlex.py",
                 "fractions.py", "heapq.py", "bisect.py", "difflib.py", "statistics.py", "pathlib.py",
                 "ipaddress.py", "datetime.py", "inspect.py", "subprocess.py", "tarfile.py", "typing.py")


class TinyLM(torch.nn.Module):
    """Embedding -> GRU -> LayerNorm -> output layer; ``hidden`` is the output layer's input."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.norm = torch.nn.LayerNorm(width)
        self.output_layer = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.norm(self.rnn(self.embed(tokens))[0])
        return hidden, self.output_layer(hidden)


def _ce(model: TinyLM, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _, logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _batches(collate, texts, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [collate([texts[i] for i in torch.randint(0, len(texts), (BATCH,), generator=g).tolist()])
            for _ in range(n)]


def _chunks(texts: list[str], size: int = 300) -> list[str]:
    joined = "\n\n".join(texts)
    return [joined[i:i + size] for i in range(0, len(joined) - size, size)]


@pytest.fixture(scope="module")
def setup():
    """Tokenizers, aligned batches and a teacher trained with cross-entropy (~5 s)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_texts = _chunks(docstrings(TRAIN_MODULES))
    s_tok, t_tok = train_bpe(300, train_texts), train_bpe(500, train_texts)
    collate = AlignmentCollator(s_tok, t_tok, seq_length=SEQ_S, teacher_seq_length=SEQ_T)
    train = _batches(collate, train_texts, 60, seed=1)
    held = collate(_chunks(docstrings(HELD_OUT_MODULES))[:48])
    teacher = TinyLM(500, 64)
    opt = torch.optim.Adam(teacher.parameters(), lr=5e-3)
    for step in range(100):
        b = train[step % len(train)]
        loss = _ce(teacher, b["teacher_tokens"], b["teacher_labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.requires_grad_(False).eval()
    return {"s_tok": s_tok, "t_tok": t_tok, "train": train, "held": held, "teacher": teacher}


def _distil(setup, name: str, params: dict, steps: int) -> tuple[float, float, list[float]]:
    """Train a fresh student on the aligner's loss only; held-out CE before and after, coverages."""
    torch.manual_seed(1)
    teacher, held = setup["teacher"], setup["held"]
    host = build_plugin_host(entry_points=False)
    aligner = host.build("vocab_aligner", name, params)
    aligner.setup(student_tokenizer=setup["s_tok"], teacher_tokenizer=setup["t_tok"],
                  objective=host.build("objective", *aligner.objective_name_and_params()))
    student = TinyLM(300, 32)
    if aligner.needs_hidden_states:
        aligner.build_projectors(32, 64)
        aligner.init_projectors(student.output_layer.weight, teacher.output_layer.weight,
                                student_vocab_size=300, teacher_vocab_size=500)
    params = list(student.parameters()) + [p for m in aligner.trainable_modules() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=5e-3)
    with torch.no_grad():
        before = _ce(student, held["student_tokens"], held["student_labels"]).item()
    coverage = []
    for step in range(steps):
        b = setup["train"][step % len(setup["train"])]
        hs, zs = student(b["student_tokens"])
        with torch.no_grad():
            ht, zt = teacher(b["teacher_tokens"])
        out = aligner.loss(AlignerInputs(
            student_logits=zs.reshape(-1, 300), teacher_logits=zt.reshape(-1, 500), pairs=pair_rows(b),
            student_labels=b["student_labels"].reshape(-1), student_hidden=hs.reshape(-1, 32),
            teacher_hidden=ht.reshape(-1, 64), student_head_weight=student.output_layer.weight,
            teacher_head_weight=teacher.output_layer.weight, student_vocab_size=300, teacher_vocab_size=500))
        loss = out.loss_sum / max(out.num_tokens, 1)  # the engine divides by the global count
        opt.zero_grad()
        loss.backward()
        opt.step()
        coverage.append(out.report["coverage"])
        assert out.report["coverage"] == alignment_report(b)["coverage"]
    with torch.no_grad():
        after = _ce(student, held["student_tokens"], held["student_labels"]).item()
    return before, after, coverage


def test_teacher_learned_something(setup):
    held = setup["held"]
    with torch.no_grad():
        assert _ce(setup["teacher"], held["teacher_tokens"], held["teacher_labels"]).item() < 4.5  # ln 500 = 6.2


def test_eta_distillation_lowers_student_loss(setup):
    before, after, coverage = _distil(setup, "eta", {"objective": "forward_kl"}, steps=80)
    assert 0.3 < sum(coverage) / len(coverage) < 1.0
    assert after < before - 1.0, (before, after)


def test_dskd_distillation_lowers_student_loss(setup):
    """DSKD alone (no CE): slower, its student-space target goes through the student's own head."""
    before, after, _ = _distil(setup, "dskd", {"objective": "forward_kl", "t2s_ce_target": "gold",
                                               "agreement_mask": False}, steps=80)
    assert after < before - 0.3, (before, after)
