"""The instruction demo and the instruction-quality benchmark end to end, scaled down.

One module-scoped :func:`distill_plugins.demo.pipeline.run_demo` with ``task="instruct"``
(tiny models, a few steps, students at TP=2 through torchrun), then
``benchmarks/instruct_quality.py``'s ``main`` on one method and one seed, reusing
the teacher the demo cached. Everything goes to a temporary cache. The numbers
of so short a run compare nothing; the claims of the full runs are in
docs/demo.md with the commands that produce them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest

from distill_plugins.demo.pipeline import INSTRUCT_STUDENTS, DemoSettings, default_recipes_dir, run_demo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

#: Tiny shapes: a 512-token BPE, 64-token windows, a 1x32 teacher and a 1x32 student.
COMMON = ("data.tokenizer=embedded:512", "data.seq_length=64", "training.micro_batch_size=4",
          "training.global_batch_size=4", "training.log_interval=1")
TEACHER = ("student.num_layers=1", "student.hidden_size=32")
STUDENT = ("student.num_layers=1", "student.hidden_size=32")


def _benchmark_module():
    """``benchmarks/instruct_quality.py`` as a module (not a package: loaded from its path, registered once)."""
    name = "benchmarks_instruct_quality"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "instruct_quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct_demo")
    settings = DemoSettings(task="instruct", output_dir=root / "out", cache=root / "cache", students=("sft", "fkl"),
                            steps=3, teacher_steps=4, nproc=2, teacher_nproc=1, overrides=COMMON,
                            teacher_overrides=TEACHER, student_overrides=STUDENT, eval_windows=8, max_new_tokens=8,
                            stream=io.StringIO())
    return root, settings, run_demo(settings)


def test_instruct_demo_rows(demo):
    _, settings, result = demo
    assert [r["name"] for r in result.rows] == ["teacher", "sft", "fkl"]
    for row in result.rows:
        assert math.isfinite(row["response_ce"]) and row["response_ce"] > 0
        assert 0.0 <= row["rouge_l"] <= 100.0
        assert row["examples"] == 8 and row["response_tokens"] > 0
        assert row["samples"] and {"prompt", "reference", "answer"} <= set(row["samples"][0])
        assert "### Response:" in row["samples"][0]["prompt"]  # the plain template's generation prompt
    assert all(r["fkl"] > 0 for r in result.rows[1:])
    for label in ("response CE", "ROUGE-L"):
        assert label in result.table and label in result.markdown
    saved = json.loads(result.results_json.read_text())
    assert saved["task"] == "instruct" and [r["name"] for r in saved["rows"]] == ["teacher", "sft", "fkl"]
    assert result.figure is not None and result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_instruct_students_are_response_only_at_tp2(demo):
    _, settings, result = demo
    for name in ("sft", "fkl"):
        run = settings.output_dir / f"student_{name}"
        resolved = (run / "recipe.resolved.yaml").read_text()
        assert "kind: instruct" in resolved and "tensor: 2" in resolved
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = [r for r in records if "loss" in r and "step" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        # response-only loss: fewer labelled positions than input positions (the prompt is masked)
        assert all(0 < r["valid_tokens"] < r["tokens"] for r in steps)


def test_instruct_teacher_is_not_trained_on_the_docstring_corpus(demo):
    _, _, result = demo
    manifest = json.loads((result.teacher.directory / "teacher.json").read_text())
    assert manifest["recipe"]["data"]["kind"] == "instruct"
    assert manifest["recipe"]["data"]["paths"] == ["embedded"]
    assert result.teacher.directory.name.startswith("instruct-teacher-")


def test_default_recipes_are_package_data():
    for task in ("docstrings", "instruct"):
        folder = default_recipes_dir(task)
        assert (folder / "teacher.yaml").is_file()
        assert "distill_plugins" in folder.parts  # found next to the package, not through the source tree
    for recipe, _label in INSTRUCT_STUDENTS.values():
        assert (default_recipes_dir("instruct") / recipe).is_file()


def test_benchmark_writes_its_files(demo, tmp_path):
    root, _, result = demo
    bench = _benchmark_module()
    argv = ["--methods", "forward_kl", "--seeds", "1", "--steps", "2", "--teacher-steps", "4", "--eval-examples", "8",
            "--max-new-tokens", "8", "--cache", str(root / "cache"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    for flag, values in (("--set", COMMON), ("--teacher-set", TEACHER), ("--student-set", STUDENT)):
        for v in values:
            argv += [flag, v]
    assert bench.main(argv) == 0
    out = tmp_path / "out"
    table = (out / "instruct_quality.md").read_text()
    assert "teacher (reference)" in table and "| forward KL |" in table
    payload = json.loads((out / "instruct_quality.json").read_text())
    assert payload["teacher_dir"] == str(result.teacher.directory)  # the demo's cached teacher was reused
    (row,) = payload["rows"]
    assert row["key"] == "forward_kl" and row["seeds"] == 1
    assert math.isfinite(row["response_ce_mean"]) and row["fkl_mean"] > 0
    assert (out / "instruct_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation re-reads the finished run instead of training it again
    trained = tmp_path / "work" / "forward_kl_seed1" / "trained.json"
    stamp = trained.stat().st_mtime_ns
    assert bench.main(argv) == 0
    assert trained.stat().st_mtime_ns == stamp
    again = json.loads((out / "instruct_quality.json").read_text())
    assert again["rows"][0]["response_ce_mean"] == row["response_ce_mean"]


def test_on_policy_rows_need_the_recorded_fraction(tmp_path):
    bench = _benchmark_module()
    methods = {m.key: m for m in bench.all_methods()}
    run = bench.Run(methods["on_policy_forward_kl"], 1, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    error = bench.check_on_policy_run(run)
    assert error is not None and bench.ON_POLICY_METRIC in error and "ignored" in error
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, bench.ON_POLICY_METRIC: 1.0}) + "\n"
                               for s in (1, 2)))
    assert bench.check_on_policy_run(run) is None
    mixed = bench.Run(methods["mixed_csd_ss"], 1, tmp_path)
    assert "expected about 0.5" in bench.check_on_policy_run(mixed)  # fraction 1.0 under a lambda-0.5 name
    assert bench.check_on_policy_run(bench.Run(methods["reverse_kl"], 1, tmp_path)) is None  # off-policy: no check
