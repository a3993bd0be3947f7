"""Smoke test: ``benchmarks/fused_step_time.py`` runs as a script at tiny sizes and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_step_time.py"


def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "fused_step_time.json"
    args = [sys.executable, str(SCRIPT), "--quick", "--vocab", "1024", "--seq", "32", "--steps", "1",
            "--layers", "1", "--teacher-layers", "1", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["median_step_time_s"]) == {"materialised", "fused"}
    assert report["time_ratio_fused_over_materialised"] > 0 and report["cpu_ratio_fused_over_materialised"] > 0
    assert len(report["losses"]["fused"]) == 2  # 1 warm-up + 1 timed step
    assert report["max_rel_loss_diff"] < 1e-5  # the same run, fused or not
    assert "fused / materialised" in result.stdout
