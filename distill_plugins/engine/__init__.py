"""The training run on megatron-core: process groups, the distillation stage, the loss glue, the loop.

Importing this package imports nothing heavy; megatron-core is imported by the
submodules. Entry point: :func:`distill_plugins.engine.run.run`. docs/engine.md,
docs/architecture.md.

Modules:
    run             Engine (built run: data, trainer, checkpoints) and run(recipe, host, cpu=...)
    trainer         Trainer: DDP, optimizer, LR schedule, one optimizer step, NaN guard, metrics
    stage           DistillStage (student + frozen teacher/reference) under megatron's pipeline schedule
    loss            selector -> temperature -> objective (+ CE mix) over vocab-parallel logits
    alignment       vocabulary aligners inside the engine (projectors, loss over two vocabularies)
    signals         SIGUSR1/SIGTERM: agree at a step boundary, save, exit 0
    process_groups  torch.distributed + megatron groups from a recipe -> ParallelContext
    cpu             CPU layer: megatron-core's CUDA-only paths on the CPU (gloo)
"""
