"""Checkpoints (single process): round trip, atomicity under a crash, pruning, resume resolution, signals."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distill_plugins.errors import DistillError
from distill_plugins.checkpoint import run_checkpoint as ckpt
from distill_plugins.checkpoint.run_checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    validate_checkpoint,
)
from distill_plugins.engine.signals import StopSignals, install_stop_handlers, restore_stop_handlers, should_stop


def tiny_training(steps: int, model=None, opt=None):
    torch.manual_seed(0) if model is None else None
    model = model or torch.nn.Linear(4, 3)
    opt = opt or torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(5, 4)  # draws from the global RNG: resume must restore it
        loss = model(x).pow(2).mean() + 0.01 * random.random() + 0.01 * float(np.random.rand())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def save_tiny(directory, step, model, opt, **kw):
    return save_checkpoint(directory, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           scheduler_state={"last_epoch": step}, data_state={"consumed_samples": step * 8},
                           parts_state={"selector": {"ema": torch.tensor([0.5, step])}}, extra={"skipped": 1}, **kw)


def test_round_trip_resumes_bit_exactly(tmp_path):
    model, opt = tiny_training(3)
    path = save_tiny(tmp_path, 3, model, opt, layout={"tp": 1, "pp": 1, "dp": 1})
    assert path == tmp_path / "step_000003" and validate_checkpoint(path, deep=True) is None
    straight, _ = tiny_training(2, model, opt)
    expected = {k: v.clone() for k, v in straight.state_dict().items()}

    torch.manual_seed(123), random.seed(5), np.random.seed(9)  # scramble every RNG
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ck = load_checkpoint(path, layout={"tp": 1, "pp": 1, "dp": 1})
    fresh.load_state_dict(ck.model_state)
    fresh_opt.load_state_dict(ck.optimizer_state)
    assert ck.step == 3 and ck.data_state == {"consumed_samples": 24} and ck.extra == {"skipped": 1}
    assert torch.equal(ck.parts_state["selector"]["ema"], torch.tensor([0.5, 3.0]))
    assert ck.scheduler_state == {"last_epoch": 3}
    resumed, _ = tiny_training(2, fresh, fresh_opt)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with pytest.raises(DistillError, match="layout"):
        load_checkpoint(path, layout={"tp": 2, "pp": 1, "dp": 1})


def test_rng_capture_restore():
    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_crash_before_commit_keeps_previous(tmp_path):
    """A real crash (process exits) after the rank files are written but before metadata + rename."""
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 1, model, opt)
    script = textwrap.dedent(f"""
        import os, torch
        from distill_plugins.checkpoint import run_checkpoint as ckpt
        def crash(*a, **k):
            os._exit(9)
        ckpt._write_metadata = crash
        m = torch.nn.Linear(4, 3)
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, model_state=m.state_dict())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("step_000002.tmp-")
    assert (tmp_path / leftovers[0] / "rank_00000.pt").is_file()  # the shard was written
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000001"
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_000001"
    # the next successful save cleans the leftover
    save_tiny(tmp_path, 3, model, opt, keep=5)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_rename_raises_and_keeps_previous(tmp_path, monkeypatch):
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 1, model, opt)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "rename", boom)
    with pytest.raises(DistillError, match="disk full.*previous checkpoint is intact"):
        save_tiny(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000001"


def test_corrupt_checkpoints_are_skipped_with_warnings(tmp_path, caplog):
    model, opt = tiny_training(1)
    for step in (1, 2, 3):
        save_tiny(tmp_path, step, model, opt)
    (tmp_path / "step_000003" / "metadata.json").unlink()  # marker missing
    with open(tmp_path / "step_000002" / "rank_00000.pt", "r+b") as fh:  # truncated shard
        fh.truncate(10)
    caplog.set_level(logging.WARNING, logger="distill_plugins")
    logging.getLogger("distill_plugins").propagate = True
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000001"
    text = caplog.text
    assert "step_000003" in text and "metadata.json" in text and "step_000002" in text and "bytes" in text
    with pytest.raises(DistillError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_000002"), tmp_path)
    # a flipped byte with the right size is caught by the checksum on load
    good = tmp_path / "step_000001" / "rank_00000.pt"
    data = bytearray(good.read_bytes())
    data[-20] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="checksum"):
        load_checkpoint(tmp_path / "step_000001")


def test_keep_and_resume_resolution(tmp_path):
    model, opt = tiny_training(1)
    for step in (1, 2, 3, 4):
        save_tiny(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 3]
    save_tiny(tmp_path, 4, model, opt, keep=2)  # re-saving a step replaces it
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 3]
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    assert resolve_resume(str(tmp_path), tmp_path / "other") == tmp_path / "step_000004"
    assert resolve_resume(str(tmp_path / "step_000003"), tmp_path) == tmp_path / "step_000003"
    with pytest.raises(DistillError, match="no such directory"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_signal_sets_flag_and_restores_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    previous_term = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.signal_name() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous
    install_stop_handlers()
    try:
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop()
    finally:
        restore_stop_handlers()
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert not should_stop()


# ---------------------------------------------------------------------------
# Faults: a full or limited disk, checkpoints the run cannot load, an interrupted replace
# ---------------------------------------------------------------------------


def _flip(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_refused_before_writing_when_a_file_would_exceed_the_size_limit(tmp_path):
    """``ulimit -f`` below the state file: the documented error names the path and the OS error."""
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 1, model, opt)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(DistillError) as info:
            save_tiny(tmp_path, 2, model, opt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    msg = str(info.value)
    assert f"checkpoint {tmp_path / 'step_000002'} was not saved" in msg
    assert "the previous checkpoint is intact" in msg and "File too large" in msg and "rank 0: prepare" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # no temporary directory left
    assert validate_checkpoint(tmp_path / "step_000001", deep=True) is None


def test_same_step_save_keeps_an_unloadable_checkpoint(tmp_path):
    """A checkpoint that fails its checksum is moved aside, bytes intact, never overwritten."""
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 2, model, opt)
    _flip(tmp_path / "step_000002" / "rank_00000.pt")
    corrupt = (tmp_path / "step_000002" / "rank_00000.pt").read_bytes()
    save_tiny(tmp_path, 2, model, opt, keep=1)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("step_000002.unloadable-")]
    assert len(aside) == 1 and (aside[0] / "rank_00000.pt").read_bytes() == corrupt
    assert validate_checkpoint(tmp_path / "step_000002", deep=True) is None
    save_tiny(tmp_path, 3, model, opt, keep=1)  # pruning never touches the kept one
    assert aside[0].is_dir() and not (tmp_path / "step_000002").exists()


def test_pruning_never_deletes_later_steps(tmp_path):
    """A fresh run saving step 1 beside step 10 and 20 of another run keeps all three."""
    model, opt = tiny_training(1)
    for step in (10, 20):
        save_tiny(tmp_path, step, model, opt)
    save_tiny(tmp_path, 1, model, opt, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 10, 1]


def test_failed_replace_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 1, model, opt)
    before = (tmp_path / "step_000001" / "metadata.json").read_text()
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # moving the new save into place fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(DistillError, match="Input/output error.*previous checkpoint is intact"):
        save_tiny(tmp_path, 1, model, opt)
    monkeypatch.undo()
    assert (tmp_path / "step_000001" / "metadata.json").read_text() == before
    assert validate_checkpoint(tmp_path / "step_000001", deep=True) is None


def test_resume_refuses_when_no_checkpoint_can_be_loaded(tmp_path):
    model, opt = tiny_training(1)
    save_tiny(tmp_path, 1, model, opt)
    save_tiny(tmp_path, 2, model, opt)
    _flip(tmp_path / "step_000002" / "rank_00000.pt")
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_000001"  # falls back to the older one
    _flip(tmp_path / "step_000001" / "rank_00000.pt")
    with pytest.raises(DistillError) as info:
        resolve_resume("auto", tmp_path)
    msg = str(info.value)
    assert "none can be loaded" in msg and "step_000002" in msg and "step_000001" in msg
    assert "checkpoint.resume: none" in msg and "Nothing was deleted" in msg
    assert resolve_resume("none", tmp_path) is None
    assert {p.name for p in tmp_path.iterdir()} == {"step_000001", "step_000002"}


def test_checksums_cover_every_file(tmp_path):
    model, opt = tiny_training(1)
    path = save_tiny(tmp_path, 1, model, opt, before_commit=lambda tmp: (tmp / "extra.json").write_text("{}"))
    meta = json.loads((path / "metadata.json").read_text())
    assert set(meta["files"]) == {"rank_00000.pt"} and set(meta["extra_files"]) == {"extra.json"}
    assert all(len(r["sha256"]) == 64 for r in [*meta["files"].values(), *meta["extra_files"].values()])
    (path / "extra.json").write_text("[]")  # same size, other bytes
    assert validate_checkpoint(path) is None
    assert "extra.json checksum mismatch" in validate_checkpoint(path, deep=True)
