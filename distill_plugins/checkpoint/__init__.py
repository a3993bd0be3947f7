"""Run checkpoints: per-rank state files, atomic saves, resume, and the optimizer's share of them.

Modules:
    run_checkpoint   save/load/resolve run checkpoints (student, optimizer, scheduler, RNG, data, parts), agreed by all ranks
    integrity        file checksums (rank files, model_dist/), their verification, agreement on errors between ranks
    optimizer_state  the optimizer's state with or without megatron's distributed optimizer
"""
