"""Smoke test: ``benchmarks/objectives.py --quick`` runs as a script and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "objectives.py"


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "objectives.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tp", "2", "--only", "forward_kl", "csd", "megatron_ce",
         "--skip", "modelopt:forward_kl", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets (issue 3):" in proc.stdout
    report = json.loads(out.read_text())
    methods = report["runs"][0]["methods"]
    for name in ("ours:forward_kl", "ours:csd", "gather:forward_kl", "megatron_ce"):
        assert methods[name]["time_s"] > 0
    # a handful of fp32 scalars per token for ours; the whole remote shard of both tensors for the gather
    assert methods["ours:forward_kl"]["bytes_per_token"] == 7 * 4
    assert methods["ours:csd"]["bytes_per_token"] == 9 * 4
    assert methods["gather:forward_kl"]["bytes_per_token"] == 2 * (4096 // 2) * 4
    assert report["pairwise"]["max_abs_grad_diff"] < 1e-4
