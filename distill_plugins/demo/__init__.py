"""The embedded-default demos and the quality benchmarks' building blocks.

``distill demo`` (:mod:`distill_plugins.cli.demo`) distils a small megatron-core
teacher, pretrained on the embedded stdlib-docstring corpus, into a smaller
student on a laptop-class CPU, and compares a CE-only, a forward-KL and a CSD
student on held-out text. ``distill demo --task instruct`` does the same on the
embedded instruction task (an SFT teacher, students distilled on response
tokens only, ROUGE-L of greedy answers). ``benchmarks/quality.py`` and
``benchmarks/instruct_quality.py`` reuse the same pieces for every method.

Modules:

* :mod:`~distill_plugins.demo.pipeline`: the demos' stages (data, tokenizer,
  cached teacher, students through ``torchrun``, evaluation, report);
* :mod:`~distill_plugins.demo.evaluate`: held-out cross-entropy, forward and
  reverse KL to the teacher, top-1 agreement, greedy continuations and ROUGE-L;
  response-only metrics and greedy answers on instruction data; on models
  rebuilt from run checkpoints at TP=1 on the CPU;
* :mod:`~distill_plugins.demo.report`: the markdown table and the loss-curve PNG.

The recipes ship as package data under ``recipes/`` (links to the source
tree's ``recipes/demo`` and ``recipes/demo_instruct``). docs/demo.md describes
what the demos do and how to read their tables.
"""
