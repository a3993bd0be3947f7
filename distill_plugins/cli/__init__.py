"""The ``distill`` command and its subcommands.

Modules:
    main    argument parsing and dispatch (``distill plugins|check|run|plan|data|export|eval|demo``)
    plan    ``distill plan``
    data    ``distill data prepare``
    export  ``distill export``
    eval    ``distill eval`` (response CE, KL to the teacher, ROUGE-L on held-out instruction data)
    demo    ``distill demo``

``python -m distill_plugins.cli`` is the same program as ``distill``.
"""

from distill_plugins.cli.main import main

__all__ = ["main"]
