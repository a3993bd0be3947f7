"""Sequence sources: where each training example's response comes from (the fifth kind of part).

Modules:
    sources  the built-in sources: ``dataset``, ``on_policy``, ``mixed`` (GKD), ``teacher_generated`` (SeqKD)

The engine side (generating the planned responses and rebuilding the batch)
is :mod:`distill_plugins.engine.sequences`. docs/sequences.md.
"""
