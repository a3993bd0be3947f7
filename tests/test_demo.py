"""The embedded-default demo end to end, scaled down: corpus, tokenizer, teacher, three students, table, PNG.

One module-scoped run of :func:`distill_plugins.demo.pipeline.run_demo` with tiny
models and a few steps (students at TP=2 through torchrun, as ``make demo``),
then several checks on what it wrote. Everything goes to a temporary cache, so
the user's cache is untouched. The numbers of so short a run compare nothing;
the full demo's claim (distilled students below the CE-only one) is checked by
running ``make demo`` (docs/demo.md).
"""

from __future__ import annotations

import io
import json
import math

import pytest

from distill_plugins.demo import report
from distill_plugins.demo.pipeline import STUDENTS, DemoSettings, ensure_teacher, run_demo, teacher_cache_key

pytestmark = pytest.mark.slow

#: Tiny shapes: a 512-token BPE, 32-token windows, a 2x32 teacher and a 1x32 student.
COMMON = ("data.tokenizer=embedded:512", "data.seq_length=32", "training.micro_batch_size=4",
          "training.global_batch_size=4", "training.log_interval=2", "student.max_position_embeddings=32",
          "teacher.max_position_embeddings=32")
TEACHER = ("student.num_layers=2", "student.hidden_size=32", "teacher.hidden_size=16")
STUDENT = ("student.num_layers=1", "student.hidden_size=32", "teacher.hidden_size=16")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(output_dir=root / "out", cache=root / "cache", steps=4, teacher_steps=6, nproc=2,
                            teacher_nproc=1,
                            overrides=COMMON, teacher_overrides=TEACHER, student_overrides=STUDENT, eval_windows=8,
                            stream=io.StringIO())
    return settings, run_demo(settings)


def test_table_has_teacher_and_every_student(demo):
    settings, result = demo
    names = [r["name"] for r in result.rows]
    assert names == ["teacher"] + list(STUDENTS)
    for row in result.rows:
        assert math.isfinite(row["ce"]) and row["ce"] > 0
        assert math.isfinite(row["fkl"]) and row["fkl"] >= 0
    assert all(r["fkl"] > 0 for r in result.rows[1:])  # untrained-ish students differ from the teacher
    for label in ("held-out CE", "KL(teacher||student)"):
        assert label in result.table and label in result.markdown
    saved = json.loads(result.results_json.read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert set(saved["stage_seconds"]) == {"data", "teacher", "students", "evaluate", "report"}


def test_students_ran_at_tp2_with_same_steps_and_seed(demo):
    settings, result = demo
    for name in STUDENTS:
        run = settings.output_dir / f"student_{name}"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        resolved = (run / "recipe.resolved.yaml").read_text()
        assert "tensor: 2" in resolved and "seed: 1234" in resolved
        assert "torch.distributed.run" in (run / "console.log").read_text().splitlines()[0]


def test_png_is_written(demo):
    _, result = demo
    assert result.figure is not None and result.figure.is_file()
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_reuses_the_cached_teacher(demo):
    settings, result = demo
    assert not result.teacher.reused
    assert (result.teacher.directory / "teacher.json").is_file()
    again = ensure_teacher(settings, tokenizer_fingerprint=result.teacher.tokenizer_fingerprint,
                           corpus_key=result.teacher.corpus_key, vocab_size=result.teacher.vocab_size,
                           test_prefix="unused")
    assert again.reused and again.directory == result.teacher.directory


def test_teacher_key_ignores_output_dir_but_not_shape():
    base = {"student": {"num_layers": 4}, "output_dir": "a", "training": {"steps": 10}}
    assert teacher_cache_key(base, "tok", "c") == teacher_cache_key({**base, "output_dir": "b"}, "tok", "c")
    assert teacher_cache_key(base, "tok", "c") != teacher_cache_key({**base, "student": {"num_layers": 2}}, "tok", "c")
    assert teacher_cache_key(base, "tok", "c") != teacher_cache_key(base, "tok2", "c")


def test_markdown_table_alignment():
    rows = [{"name": "a", "ce": 1.23456}, {"name": "bb", "ce": None}]
    table = report.markdown_table(rows, [("name", "model", "{}"), ("ce", "CE", "{:.2f}")])
    lines = table.splitlines()
    assert lines[0] == "| model | CE   |"
    assert lines[1].endswith("-:|")
    assert "1.23" in lines[2] and "n/a" in lines[3]
