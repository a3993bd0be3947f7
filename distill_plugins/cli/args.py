"""Argument parsing shared by the ``distill`` subcommands.

:class:`IntermixedParser` lets ``key=value`` overrides stand anywhere on the command line
(``distill eval R --checkpoint P k=v`` as well as ``distill eval R k=v --checkpoint P``).
"""

from __future__ import annotations

import argparse

__all__ = ["IntermixedParser"]


class IntermixedParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose positionals and options may come in any order.

    Plain argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``R --flag k=v`` would leave ``k=v`` unrecognised; this parser parses intermixed.
    ``distill``'s subcommands are created with it (``add_subparsers(parser_class=...)``).
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # argparse cannot intermix a parser that has subcommands of its own (``distill plugins list``)
        if self._intermixing or any(action.nargs == argparse.PARSER for action in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
