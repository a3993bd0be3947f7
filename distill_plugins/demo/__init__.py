"""The embedded default demo and the quality benchmark's building blocks.

``distill demo`` (:mod:`distill_plugins.cli.demo`) distils a small megatron-core
teacher, pretrained on the embedded stdlib-docstring corpus, into a smaller
student on a laptop-class CPU, and compares a CE-only, a forward-KL and a CSD
student on held-out text. ``benchmarks/quality.py`` reuses the same pieces for
every registered objective.

Modules:

* :mod:`~distill_plugins.demo.pipeline`: the demo's stages (corpus, tokenizer,
  cached teacher, students through ``torchrun``, evaluation, report);
* :mod:`~distill_plugins.demo.evaluate`: held-out cross-entropy, forward and
  reverse KL to the teacher, top-1 agreement, greedy continuations and ROUGE-L,
  on models rebuilt from run checkpoints at TP=1 on the CPU;
* :mod:`~distill_plugins.demo.report`: the markdown table and the loss-curve PNG.

docs/demo.md describes what the demo does and how to read its table.
"""
