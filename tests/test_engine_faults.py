"""Faults around ``distill run`` in one process: an unwritable output directory, a stop signal during
start-up, and the metrics file after a resume from an older checkpoint.

The start-up signal runs ``distill run`` on the tiny recipe in a subprocess (single rank, CPU) and sends
SIGUSR1 from inside the engine's construction (after the CLI started, before the first step): the run
must stop cleanly with status 0, no traceback, and ask for a requeue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from distill_plugins.cli.main import main
from distill_plugins.engine.callbacks import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "base.yaml")


def test_unwritable_output_dir_is_a_clear_error(tmp_path, capsys):
    """exit status 2 and a message naming the key, the path and the OS error; no traceback, no model built."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cases = [str(blocker / "run")]  # a file where a directory should be (works for every user, root included)
    if os.geteuid() != 0:  # root ignores directory permissions
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        cases.append(str(read_only / "run"))
    for out in cases:
        status = main(["run", TINY, f"output_dir={out}", "training.steps=3"])
        err = capsys.readouterr().err
        assert status == 2, err
        assert f"output_dir={out!r} is not writable" in err
        assert "Errno" in err and "Traceback" not in err


def test_stop_signal_during_startup_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import distill_plugins.engine.run as engine_run
        from distill_plugins.cli.main import main

        resolve_specs = engine_run.resolve_specs

        def slow_startup(recipe):  # the first thing the engine does while it is being built
            os.kill(os.getpid(), signal.SIGUSR1)
            return resolve_specs(recipe)

        engine_run.resolve_specs = slow_startup
        sys.exit(main(["run", {TINY!r}, "output_dir={out}", "training.steps=3"]))
    """)
    env = {**os.environ, "DISTILL_PLUGINS_NO_ENTRY_POINTS": "1"}
    env.pop("DISTILL_REQUEUE_MARKER", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "stop signal received during start-up" in proc.stderr
    assert (out / "REQUEUE").read_text() == "step=0\n"  # unfinished: the job script requeues
    assert not (out / "metrics.jsonl").exists()  # no step was trained


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_trims_replayed_steps(tmp_path):
    """Lines after the resumed step (and a line cut by a crash) move to metrics.trimmed.jsonl."""
    log = MetricsLog(tmp_path, writer=True)
    for step in range(1, 8):
        log.append({"step": step, "loss": 1.0 / step, "grad_norm": float("nan")})
    log.append({"step": 6, "eval_kd_loss": 0.5})
    with open(log.path, "a") as fh:
        fh.write('{"step": 8, "lo')  # killed mid-write
    assert log.trim(5) == 4
    kept = _lines(log.path)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert kept[0]["grad_norm"] is None  # non-finite numbers are written as null
    moved = _lines(log.trimmed_path)
    assert [r.get("step") for r in moved] == [6, 7, 6, None]
    assert all(r["trimmed_at_resume_from"] == 5 for r in moved)
    assert moved[-1]["unparsed_line"] == '{"step": 8, "lo'
    log.append({"step": 6, "loss": 0.1})
    assert [r["step"] for r in _lines(log.path)] == [1, 2, 3, 4, 5, 6]
    assert log.trim(6) == 0  # nothing after step 6: the file is left alone
    reader = MetricsLog(tmp_path, writer=False)  # other ranks neither write nor trim
    reader.append({"step": 7})
    assert reader.trim(0) == 0 and len(_lines(log.path)) == 6


def test_a_fresh_start_moves_every_old_line(tmp_path):
    log = MetricsLog(tmp_path, writer=True)
    log.append({"step": 1, "loss": 2.0})
    assert log.trim(0) == 1 and _lines(log.path) == []
