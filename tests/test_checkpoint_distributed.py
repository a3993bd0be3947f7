"""Two gloo ranks in one process group: per-rank checkpoint save/load with exact resume, a failed
rank aborting the commit, stop-signal agreement, the collective indexed-data build, and megatron's
dist_checkpointing save failing on one rank between its collectives (every rank raises, no hang;
the failures are simulated: rank 0's common.pt write, rank 1's writer process), plus a corrupted
model_dist/ file refused at load on every rank."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
import torch.distributed as dist

from distill_plugins.testing.distributed import run_distributed


def _train(model, opt, steps):
    for _ in range(steps):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def rank_body(rank, world_size, ckpt_dir, data_prefix, tok_path, out_dir):
    from distill_plugins.errors import DistillError
    from distill_plugins.checkpoint.run_checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
    from distill_plugins.engine.signals import StopSignals

    result = {}
    # -- checkpoint: each rank holds a different shard (different init) ------------------
    torch.manual_seed(100 + rank)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _train(model, opt, 2)
    path = save_checkpoint(ckpt_dir, 2, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           data_state={"consumed_samples": 16}, parts_state={"p": {"rank": rank}},
                           layout={"tp": 2, "pp": 1, "dp": 1}, keep=2)
    _train(model, opt, 2)
    result["straight"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(999)
    fresh = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.05)
    ck = load_checkpoint(path, layout={"tp": 2, "pp": 1, "dp": 1})
    fresh.load_state_dict(ck.model_state)
    fresh_opt.load_state_dict(ck.optimizer_state)
    _train(fresh, fresh_opt, 2)
    result["resumed"] = {k: v.clone() for k, v in fresh.state_dict().items()}
    result["parts"] = ck.parts_state
    result["path"] = str(path)

    # -- rank 1 cannot write its state: nobody commits step 4, everyone raises --------------
    bad = {"w": model.weight} if rank == 0 else {"unpicklable": lambda: None}
    try:
        save_checkpoint(ckpt_dir, 4, model_state=bad)
        result["failed_save"] = "no error"
    except DistillError as exc:
        result["failed_save"] = str(exc)
    dist.barrier()
    result["latest"] = str(find_latest_checkpoint(ckpt_dir))

    # -- stop signal on rank 1 only -----------------------------------------------------
    with StopSignals() as stop:
        result["before"] = stop.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        result["after"] = stop.should_stop()

    # -- indexed data: collective GPTDataset build; each DP rank takes its slice --------
    from distill_plugins.data.iterators import build_data
    from distill_plugins.recipe.schema import DataSpec, Recipe, TrainingSpec

    recipe = Recipe(data=DataSpec(kind="indexed", paths=[data_prefix], tokenizer=tok_path, seq_length=8,
                                  split="90,5,5"),
                    training=TrainingSpec(steps=2, micro_batch_size=2, global_batch_size=8), seed=3,
                    output_dir=out_dir)
    it = build_data(recipe, dp_rank=rank, dp_size=world_size)
    result["data"] = [next(it) for _ in range(2)]
    result["consumed"] = it.consumed_samples

    # -- weights also through megatron dist_checkpointing (needs the CPU layer on CPU) --------
    from distill_plugins.checkpoint.run_checkpoint import load_dist_model_state
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from megatron.core.dist_checkpointing import ShardedTensor

    full = torch.arange(12.0).reshape(4, 3)
    shard = full[2 * rank:2 * rank + 2].clone()  # rows split over the 2 ranks, as TP would
    sharded = {"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, world_size), replica_id=0)}
    path = save_checkpoint(ckpt_dir + "_dist", 1, model_state={"w": shard}, sharded_model_state=sharded)
    ck = load_checkpoint(path)
    same = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 3), (0, rank, world_size), replica_id=0)}
    result["dist_same"] = load_dist_model_state(ck, same)["w"]
    whole = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 3), replica_id=rank)}  # another layout
    result["dist_whole"] = load_dist_model_state(ck, whole)["w"]
    result["shard"] = shard

    # -- megatron's save fails on one rank between two of its collectives: every rank raises ----------
    from megatron.core.dist_checkpointing.strategies import common as mcommon
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    def dist_save(step):
        sharded = {"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, world_size), replica_id=0)}
        return save_checkpoint(ckpt_dir + "_dist", step, model_state={"w": shard}, sharded_model_state=sharded)

    def error_of(fn):
        try:
            fn()
        except DistillError as exc:
            return str(exc)
        return None

    save_common = mcommon.TorchCommonSaveStrategy.save_common
    if rank == 0:  # only rank 0 writes common.pt; here its disk is read-only
        def read_only(self, state, checkpoint_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(str(checkpoint_dir), "common.pt"))

        mcommon.TorchCommonSaveStrategy.save_common = read_only
    result["common_fail"] = error_of(lambda: dist_save(2))
    mcommon.TorchCommonSaveStrategy.save_common = save_common
    write_item = fsa._write_item
    if rank == 1:  # rank 1's writer process (forked by megatron) finds the disk full
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        fsa._write_item = disk_full
    result["writer_fail"] = error_of(lambda: dist_save(3))
    fsa._write_item = write_item
    dist.barrier()
    result["dist_dirs"] = sorted(os.listdir(ckpt_dir + "_dist"))
    result["dist_latest"] = str(find_latest_checkpoint(ckpt_dir + "_dist"))
    dist.barrier()  # every rank has looked before rank 0 rewrites a file below
    # -- a flipped byte in model_dist/ (rank 1's share or not): loading refuses on every rank ----------
    model_dist = os.path.join(str(path), "model_dist")
    if rank == 0:
        name = sorted(f for f in os.listdir(model_dist) if f.endswith(".distcp"))[-1]
        data = bytearray(open(os.path.join(model_dist, name), "rb").read())
        data[-10] ^= 0xFF
        open(os.path.join(model_dist, name), "wb").write(bytes(data))
    dist.barrier()
    result["load_flipped"] = error_of(lambda: load_dist_model_state(ck, same))
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from distill_plugins.data.indexed import write_indexed_dataset
    from distill_plugins.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("ckdist")
    texts = [f"document {i} has some words in it, {i * 3} of them." for i in range(80)]
    tok = train_bpe_tokenizer(texts, 300)
    tok.save(root / "tok.json")
    write_indexed_dataset(texts, tok, root / "ds", progress=False)
    res = run_distributed(rank_body, world_size=2,
                          args=(str(root / "ckpt"), str(root / "ds"), str(root / "tok.json"), str(root / "run")))
    return root, res


def test_multi_rank_save_and_exact_resume(results):
    root, res = results
    meta = json.loads((root / "ckpt" / "step_000002" / "metadata.json").read_text())
    assert sorted(meta["files"]) == ["rank_00000.pt", "rank_00001.pt"] and meta["world_size"] == 2
    for rank, r in enumerate(res):
        assert r["parts"] == {"p": {"rank": rank}}
        for k in r["straight"]:
            assert torch.equal(r["straight"][k], r["resumed"][k]), (rank, k)
    assert not torch.equal(res[0]["straight"]["weight"], res[1]["straight"]["weight"])


def test_failed_rank_aborts_commit_on_all_ranks(results):
    root, res = results
    for r in res:
        assert "was not saved" in r["failed_save"] and "rank 1" in r["failed_save"]
        assert r["latest"].endswith("step_000002")
    assert not (root / "ckpt" / "step_000004").exists()


def test_stop_signal_agreed_by_all_ranks(results):
    _, res = results
    assert [r["before"] for r in res] == [False, False]
    assert [r["after"] for r in res] == [True, True]


def test_collective_indexed_data_dp_slices(results):
    _, res = results
    ids = [torch.cat([b["sample_ids"] for b in r["data"]]).tolist() for r in res]
    assert ids == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [r["consumed"] for r in res] == [8, 8]
    rows = [torch.cat([b["tokens"] for b in r["data"]]) for r in res]
    assert not torch.equal(rows[0], rows[1])


def test_dist_checkpointing_weights_reshard(results):
    _, res = results
    for r in res:
        assert torch.equal(r["dist_same"], r["shard"])
        assert torch.equal(r["dist_whole"], torch.arange(12.0).reshape(4, 3))


def test_dist_save_failing_on_one_rank_fails_everywhere(results):
    """rank 0's common.pt and rank 1's writer: both ranks get the documented error; nothing committed."""
    root, res = results
    for r in res:
        assert "step_000002 was not saved" in r["common_fail"] and "previous checkpoint is intact" in r["common_fail"]
        assert "rank 0" in r["common_fail"] and "Read-only file system" in r["common_fail"]
        assert "common.pt" in r["common_fail"]
        assert "step_000003 was not saved" in r["writer_fail"] and "No space left on device" in r["writer_fail"]
        assert r["dist_latest"].endswith("step_000001")
        assert r["dist_dirs"] == ["step_000001"], r["dist_dirs"]  # failed saves leave no temporary directory


def test_corrupt_model_dist_is_refused_on_every_rank(results):
    _, res = results
    for r in res:
        assert r["load_flipped"] is not None and "checksum mismatch" in r["load_flipped"]
        assert "model_dist/" in r["load_flipped"]
