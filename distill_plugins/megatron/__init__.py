"""The megatron-core engine: models, co-located teacher, pipeline, loss glue, training loop, CPU layer.

Importing this package imports nothing heavy; megatron-core is imported by the
submodules that need it. Entry point: :func:`distill_plugins.megatron.engine.run`.
See docs/engine.md and docs/cpu_dry_run.md.

Submodules:
    cpu             CPU layer (``enable_cpu_mode``) for ``device: cpu`` dry runs and tests
    parallel_state  torch.distributed + megatron groups from a recipe -> ParallelContext
    models          GPTModel from ModelSpec; padded vocab; PP split; full weights <-> shards
    teacher         frozen teacher (build, load, freeze)
    pipeline        DistillStage and the pipeline schedule carrying both hidden states
    loss            selector -> temperature -> objective (+ CE mix) over vocab-parallel logits
    train           Trainer: DDP, optimizer, LR schedule, NaN guard, progress, metrics
    engine          run(recipe, host, cpu=...) -> exit status
    synthetic       layout-independent synthetic batches
"""
