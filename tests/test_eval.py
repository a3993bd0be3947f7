"""Generation-based evaluation: ``rouge_l_f1``, ``distill eval`` on a run checkpoint and on an exported model,
the in-run ``training.eval_generate`` line, TP=2, and the errors (docs/eval.md).

One tiny instruction run (2 steps, a 400-token BPE trained on stdlib docstrings, 40 prompt/response records
in a JSONL file, CPU) is trained in this process once for the module; every check evaluates its checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM

from distill_plugins.cli.eval import summary_lines
from distill_plugins.cli.main import main
from distill_plugins.data.instruct import collate_instruct, instruct_source
from distill_plugins.engine import evaluation
from distill_plugins.engine.evaluation import rouge_l_f1, rouge_l_scores
from distill_plugins.errors import DistillError
from distill_plugins.recipe.load import load_recipe
from distill_plugins.testing.distributed import run_distributed
from test_aligners import docstrings, train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma".split()
RECORDS = 40  # split 60,20,20 -> 8 valid examples
VALID = 8


def _records() -> list[dict]:
    rows = []
    for i in range(RECORDS):
        words = [WORDS[(3 * i + k) % len(WORDS)] for k in range(2 + i % 3)]
        rows.append({"prompt": f"Repeat the words: {' '.join(words)}", "response": " ".join(words) + "."})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained 2-step run: ``recipe`` (YAML path), ``ckpt`` (its step_2), ``out`` (its output_dir)."""
    root = tmp_path_factory.mktemp("eval")
    train_bpe(400, docstrings()).save(str(root / "tokenizer.json"))
    data = root / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    model = dict(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                 max_position_embeddings=128)
    recipe = {
        "description": "test_eval", "device": "cpu", "seed": 3, "output_dir": str(root / "run"),
        "student": model, "teacher": {**model, "num_layers": 2, "hidden_size": 48},
        "parallel": {"tensor": 1, "pipeline": 1, "make_vocab_size_divisible_by": 16},
        "data": {"kind": "instruct", "paths": [str(data)], "tokenizer": str(root / "tokenizer.json"),
                 "template": "plain", "seq_length": 64, "split": "60,20,20"},
        "training": {"steps": 2, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 2,
                     "eval_batches": 1, "eval_generate": 4, "eval_max_new_tokens": 12},
        "checkpoint": {"interval": 0, "resume": "none"}, "objective": "forward_kl",
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["run", str(path)]) == 0
    ckpt = root / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "metadata.json").is_file()
    return {"recipe": path, "ckpt": ckpt, "out": root / "run", "root": root, "tokenizer": root / "tokenizer.json"}


@pytest.fixture(scope="module")
def ckpt_eval(run):
    """``distill eval --checkpoint <run dir>`` of the run: the JSON report and what the command printed."""
    out_json = run["root"] / "eval_ckpt.json"
    assert main(["eval", str(run["recipe"]), "--checkpoint", str(run["out"]), "--output", str(out_json),
                 "--max-new-tokens", "12"]) == 0
    return json.loads(out_json.read_text())


def _metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------


def test_rouge_l_matches_rouge_score_and_known_values():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    lib = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l_f1([pred], [ref]) == pytest.approx(100 * lib, abs=1e-12)
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F1 = 5/6
    assert rouge_l_f1([pred], [ref]) == pytest.approx(100 * 5 / 6, abs=1e-9)
    assert rouge_l_f1(["Open a file."], ["open a FILE"]) == pytest.approx(100.0)  # lower-cased, punctuation dropped
    assert rouge_l_f1(["x y"], ["z"]) == 0.0
    assert rouge_l_f1([pred, "x y"], [ref, "z"]) == pytest.approx(100 * (5 / 6) / 2)
    assert rouge_l_scores(["", "a"], ["a", ""]) == [0.0, 0.0]
    with pytest.raises(DistillError, match="one reference per prediction"):
        rouge_l_f1(["a"], ["a", "b"])
    with pytest.raises(DistillError, match="no examples"):
        rouge_l_f1([], [])


# ---------------------------------------------------------------------------
# distill eval
# ---------------------------------------------------------------------------


def test_eval_checkpoint_writes_json_and_metrics_line_and_matches_in_run(run, ckpt_eval):
    report = ckpt_eval
    m = report["metrics"]
    assert report["step"] == 2 and report["split"] == "valid" and report["student"].startswith("checkpoint:")
    assert m["eval_examples"] == VALID and len(report["examples"]) == VALID
    assert len({e["example"] for e in report["examples"]}) == VALID  # each held-out example once
    for key in ("eval_response_ce", "eval_teacher_response_ce", "eval_kl"):
        assert math.isfinite(m[key]) and m[key] >= 0, key
    assert m["eval_kl"] > 0  # a student and a random teacher of another width differ
    assert 0 <= m["eval_rouge_l"] <= 100
    assert 0 < m["eval_answer_tokens"] <= 12 and any(e["answer"] for e in report["examples"])
    # the reported ROUGE-L is rouge-score's mean over the answers written
    answers = [e["answer"] for e in report["examples"]]
    refs = [e["reference"] for e in report["examples"]]
    assert m["eval_rouge_l"] == pytest.approx(rouge_l_f1(answers, refs), abs=1e-9)
    assert all(e["reference"].endswith(".") and e["prompt"].startswith("### Instruction:") for e in report["examples"])
    line = _metrics_lines(run["out"])[-1]
    assert line["step"] == 2 and line["eval_rouge_l"] == pytest.approx(m["eval_rouge_l"])
    assert line["eval_response_ce"] == pytest.approx(m["eval_response_ce"])
    printed = "\n".join(summary_lines(report))
    assert f"{VALID} examples of the valid split" in printed and f"{m['eval_rouge_l']:.2f}" in printed
    assert f"{m['eval_kl']:.4f}" in printed and f"{m['eval_response_ce']:.4f}" in printed

    # in-run (training.eval_generate: 4 at step 2) = distill eval --num-examples 4 on the step-2 weights
    in_run = [r for r in _metrics_lines(run["out"]) if "eval_rouge_l" in r and r["step"] == 2][0]
    assert in_run["eval_examples"] == 4
    four = run["root"] / "eval_four.json"
    assert main(["eval", str(run["recipe"]), "--checkpoint", str(run["ckpt"]), "--num-examples", "4",
                 "--output", str(four), "--output-dir", str(run["root"] / "elsewhere")]) == 0
    m4 = json.loads(four.read_text())["metrics"]
    for key in ("eval_response_ce", "eval_kl", "eval_rouge_l", "eval_answer_tokens"):
        assert m4[key] == pytest.approx(in_run[key], rel=1e-6, abs=1e-9), key
    assert (run["root"] / "elsewhere" / "metrics.jsonl").is_file()


def test_eval_no_generate_in_row_chunks_gives_the_same_ce_and_kl(run, ckpt_eval, monkeypatch):
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_ELEMENTS", 3 * 400)  # a few rows per chunk
    out_json = run["root"] / "eval_chunks.json"
    assert main(["eval", str(run["recipe"]), "--checkpoint", str(run["ckpt"]), "--no-generate",
                 "--output", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["metrics"]["eval_rouge_l"] is None and report["examples"] == []
    for key in ("eval_response_ce", "eval_teacher_response_ce", "eval_kl", "eval_response_tokens"):
        assert report["metrics"][key] == pytest.approx(ckpt_eval["metrics"][key], rel=1e-6), key


def test_eval_exported_model_gives_the_checkpoint_figures(run, ckpt_eval):
    export = run["root"] / "export"
    assert main(["export", str(run["ckpt"]), str(export), "--tokenizer-dir", str(run["tokenizer"])]) == 0
    out_json = run["root"] / "eval_hf.json"
    assert main(["eval", str(run["recipe"]), "--model", f"hf:{export}", "--output", str(out_json),
                 "--max-new-tokens", "12"]) == 0
    report = json.loads(out_json.read_text())
    assert report["step"] == 0 and report["student"] == f"hf:{export}"
    ref = ckpt_eval["metrics"]
    for key in ("eval_response_ce", "eval_kl", "eval_rouge_l", "eval_examples"):
        assert report["metrics"][key] == pytest.approx(ref[key], rel=1e-5), key
    assert [e["answer"] for e in report["examples"]] == [e["answer"] for e in ckpt_eval["examples"]]
    # independent: transformers' forward of the exported model over the same held-out batch
    recipe, _ = load_recipe(str(run["recipe"]))
    source = instruct_source(recipe, "valid")
    batch = collate_instruct(source, range(source.num_samples))
    hf = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"]).logits.float()
    mask = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], batch["labels"][mask]).item()
    assert int(mask.sum()) == report["metrics"]["eval_response_tokens"]
    assert ce == pytest.approx(report["metrics"]["eval_response_ce"], rel=1e-4)


def test_eval_errors_name_the_value_and_the_fix(run, capsys, tmp_path):
    recipe = str(run["recipe"])

    def fails(args, *expected):
        assert main(["eval", recipe, *args]) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (text, err)

    fails(["--checkpoint", str(tmp_path / "nope")], "no such directory")
    fails(["--checkpoint", str(tmp_path)], "no step_N/metadata.json")
    fails(["--model", "onnx:/x"], "expected hf:DIR, megatron:DIR or checkpoint:DIR")
    fails(["--model", f"hf:{tmp_path}"], "has no config.json", "distill export")
    fails(["data.kind=synthetic", "--checkpoint", str(run["ckpt"])], "data.kind='synthetic'", "data.kind: instruct")
    fails(["--checkpoint", str(run["ckpt"]), "--num-examples", "0"], "--num-examples 0")
    broken = tmp_path / "step_000002"
    shutil.copytree(run["ckpt"], broken)
    victim = sorted(p for p in (broken / "model_dist").rglob("*") if p.is_file() and p.stat().st_size > 100)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    fails(["--checkpoint", str(broken)], "cannot be loaded", victim.name)
    # a recipe key the evaluation reads, checked where the recipe is loaded
    assert main(["check", recipe, "training.eval_generate=-1"]) == 2
    assert "training.eval_generate must be >= 0" in capsys.readouterr().err
    assert main(["check", recipe, "teacher_parallel.ranks=1"]) == 2  # the teacher ranks would not take part
    assert "generation-based evaluation during a run with teacher_parallel is not supported" in capsys.readouterr().err
    assert main(["check", recipe, "data.kind=jsonl"]) == 2
    assert "training.eval_generate=4 answers held-out prompts, but data.kind='jsonl'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# TP=2 (one process group for the module)
# ---------------------------------------------------------------------------


def _eval_tp2(rank: int, world_size: int, recipe: str, ckpt: str, out: str) -> int:
    return main(["eval", recipe, "parallel.tensor=2", "--checkpoint", ckpt, "--output", out, "--max-new-tokens", "12",
                 "--output-dir", str(Path(out).parent / "tp2")])


def test_eval_under_tp2_matches_tp1(run, ckpt_eval):
    out = run["root"] / "eval_tp2.json"
    assert run_distributed(_eval_tp2, world_size=2, args=(str(run["recipe"]), str(run["ckpt"]), str(out))) == [0, 0]
    report = json.loads(out.read_text())
    assert report["layout"]["tp"] == 2
    ref = ckpt_eval["metrics"]
    for key in ("eval_response_ce", "eval_teacher_response_ce", "eval_kl"):
        assert report["metrics"][key] == pytest.approx(ref[key], rel=1e-4), key
    assert report["metrics"]["eval_rouge_l"] == pytest.approx(ref["eval_rouge_l"], abs=1e-6)
    assert report["metrics"]["eval_examples"] == VALID
    assert [e["answer"] for e in report["examples"]] == [e["answer"] for e in ckpt_eval["examples"]]
