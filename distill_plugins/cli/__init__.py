"""The ``distill`` command and its subcommands.

Modules:
    main    argument parsing and dispatch (``distill plugins|check|run|plan|data|export|demo``)
    plan    ``distill plan``
    data    ``distill data prepare``
    export  ``distill export``
    demo    ``distill demo``

``python -m distill_plugins.cli`` is the same program as ``distill``.
"""

from distill_plugins.cli.main import main

__all__ = ["main"]
