"""Exception types raised by distill_plugins.

Every error a user can cause derives from :class:`DistillError`, so the CLI can
print it without a traceback and exit with status 2.
"""

from __future__ import annotations


class DistillError(Exception):
    """Base class for errors caused by a user's input or environment."""


class RecipeError(DistillError):
    """A recipe is malformed. ``errors`` holds every problem found, one string each."""

    def __init__(self, errors: list[str] | str, subject: str = "recipe"):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{subject} has {len(self.errors)} error(s):\n{lines}")


class PluginError(DistillError):
    """A plugin failed to load, or registered a part badly."""


class UnknownPartError(DistillError, KeyError):
    """A part name is not registered under its kind."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that.
        return str(self.args[0])


class InputError(DistillError, ValueError):
    """Tensors handed to a part break its contract (shapes, NaN logits, vocab sizes)."""


class RecipeWarning(str):
    """A recipe problem that does not stop a check (e.g. a model directory absent on this machine).

    A part's ``check_recipe`` may return these among its error strings; validation
    logs them as warnings instead of failing.
    """
