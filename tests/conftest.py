"""Suite-wide settings: property tests draw the same examples on every run (no flaky CI)."""

from hypothesis import settings

settings.register_profile("distill", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("distill")
