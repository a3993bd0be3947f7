"""Smoke test: ``benchmarks/fused_output_layer.py`` runs as a script at tiny sizes and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_output_layer.py"


def test_tiny_benchmark_runs(tmp_path):
    out = tmp_path / "fused.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--vocab", "1000", "--tokens", "96", "--hidden", "32", "--teacher-hidden", "48",
         "--tp", "1", "2", "--reps", "1", "--warmup", "0", "--chunk-rows", "40", "--ce-weight", "0.5",
         "--objective", "csd", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets (issue 16):" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["tp"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        # padded to a multiple of 128 x TP, real size V - 13, split over the ranks
        assert run["padded_vocab"] == 1024 and run["real_vocab"] == 987 and run["v_local"] == 1024 // run["tp"]
        assert run["chunk_rows"] == 40
        for method in ("materialised", "fused"):
            assert run[method]["time_s"] > 0 and run[method]["peak_extra_bytes"] >= 0
        assert max(run["max_rel_diff"].values()) < 1e-5, run["max_rel_diff"]
        assert abs(run["fused"]["kd_loss"] - run["materialised"]["kd_loss"]) < 1e-4
    assert report["targets"]["all_met"]
