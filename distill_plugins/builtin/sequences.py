"""Built-in sequence sources, registered like any plugin's (see docs/sequences.md)."""

from __future__ import annotations

from distill_plugins.hookspecs import hookimpl
from distill_plugins.sequences.sources import (DatasetSequences, MixedSequences, OnPolicySequences,
                                               TeacherGeneratedSequences)


@hookimpl
def distill_register_sequence_sources(register):
    register("dataset", DatasetSequences)
    register("on_policy", OnPolicySequences)
    register("mixed", MixedSequences)
    register("teacher_generated", TeacherGeneratedSequences)
