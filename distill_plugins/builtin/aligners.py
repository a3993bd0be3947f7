"""Built-in vocabulary aligners, registered like any plugin's (see docs/aligners.md)."""

from __future__ import annotations

from distill_plugins.aligners import DSKDAligner, ETAAligner, IdentityAligner, ULDAligner
from distill_plugins.hookspecs import hookimpl


@hookimpl
def distill_register_vocab_aligners(register):
    register("identity", IdentityAligner)
    register("eta", ETAAligner)
    register("dskd", DSKDAligner)
    register("uld", ULDAligner)
