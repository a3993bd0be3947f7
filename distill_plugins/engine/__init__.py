"""The training run on megatron-core: process groups, the distillation stage, the loss glue, the loop.

Importing this package imports nothing heavy; megatron-core is imported by the
submodules. Entry point: :func:`distill_plugins.engine.run.run`. docs/engine.md,
docs/architecture.md.

Modules:
    run             Engine (built run; Engine.train, the one training loop) and run(recipe, host, cpu=...)
    callbacks       the loop's Callback protocol; metrics.jsonl, progress, plugin observers, schedules, signals
    trainer         Trainer: DDP, optimizer, LR schedule, one optimizer step, NaN guard, step metrics
    stage           DistillStage (student + frozen teacher/reference) under megatron's pipeline schedule
    loss            selector -> temperature -> objective (+ CE mix) over vocab-parallel logits
    fused_loss      the same from the last stage's hidden states and output-layer shards (fused output layer)
    alignment       vocabulary aligners inside the engine (projectors, loss over two vocabularies)
    generate        batched autoregressive generation under TP/PP (KV cache, per-row seeds)
    sequences       sequence sources in the step: plan, generate (on-policy / SeqKD), rebuild the batches
    signals         SIGUSR1/SIGTERM: agree at a step boundary, save, exit 0
    process_groups  torch.distributed + megatron groups from a recipe -> ParallelContext
    cpu             CPU layer: megatron-core's CUDA-only paths on the CPU (gloo)
    teacher_ranks   a teacher on its own ranks: rank split, routing table, layout checks (torch-free)
    role_groups     both roles' megatron groups; this rank's role installed in parallel_state
    remote_teacher  the teacher ranks' loop (TeacherServer), the student's receiver (RemoteTeacher), SeparateRun
    evaluation      held-out instruction evaluation: response CE, KL to the teacher, ROUGE-L of greedy answers
"""
