"""Graceful stop on SIGUSR1/SIGTERM: every rank agrees at a step boundary, saves, exits 0.

Design. A signal handler may run at any bytecode boundary, in the middle of
a collective, so it only sets a flag. At the end of each optimizer step the
training loop calls :func:`should_stop`, an all-reduce MAX of the local flag
over the whole world: if any rank got a signal, every rank sees ``True`` at
the same step, saves a checkpoint and exits with status 0. A SLURM job
submitted with ``--signal=USR1@120`` (USR1 120 s before the time limit) and
``--requeue`` then continues from that checkpoint with ``checkpoint.resume:
auto``: the launch script's ``trap`` requeues the job (``scontrol requeue
$SLURM_JOB_ID``). ``srun`` forwards the signal to every task, but only one
rank needs to receive it.

The engine's loop uses them through its ``StopOnSignal`` callback
(:mod:`.callbacks`); ``distill run`` installs the process-wide handlers
(:func:`install_stop_handlers`) before the slow start-up (imports, model
building, resume), so a signal that arrives then stops the run at the first
step boundary without a traceback.

Usage::

    with StopSignals() as stop:            # installs handlers, restores the old ones on exit
        for step in ...:
            train_step()
            if stop.should_stop():         # collective: call on every rank, every step
                save_checkpoint(...)
                break

or, without a ``with`` block: ``install_stop_handlers()`` ... ``should_stop(group)``
... ``restore_stop_handlers()``.

Handlers can only be installed from the main thread; elsewhere (some test
runners) installation logs a warning and the flag is then only set by
:meth:`StopSignals.request_stop`.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from distill_plugins.logging import get_logger

log = get_logger(__name__)

#: Signals that request a graceful stop.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """Sets a flag on SIGUSR1/SIGTERM; :meth:`should_stop` makes all ranks agree on it.

    Args:
        signals: the signals to catch (default :data:`STOP_SIGNALS`).
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None  # number of the first signal caught
        self._previous: dict[int, object] = {}
        self._installed = False

    # -- handler ---------------------------------------------------------
    def _handle(self, signum, frame) -> None:  # runs between bytecodes: only set the flag
        if self.received is None:
            self.received = signum

    def install(self) -> "StopSignals":
        """Install the handlers, remembering the previous ones. Idempotent."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGUSR1/SIGTERM handlers not installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    @property
    def installed(self) -> bool:
        """Whether this object's handlers are in place."""
        return self._installed

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if not self._installed:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- flag ------------------------------------------------------------
    @property
    def local_flag(self) -> bool:
        """True if this process caught a stop signal (or :meth:`request_stop` was called)."""
        return self.received is not None

    def request_stop(self, signum: int = signal.SIGUSR1) -> None:
        """Set the flag as if ``signum`` had arrived (tests, programmatic stops)."""
        self._handle(signum, None)

    def reset(self) -> None:
        """Clear the flag."""
        self.received = None

    def signal_name(self) -> Optional[str]:
        """``SIGUSR1``/``SIGTERM`` of the caught signal, or None."""
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop(self, group=None) -> bool:
        """True on every rank if any rank of ``group`` (default: world) caught a stop signal.

        Collective: all ranks of ``group`` must call it at the same point
        (the end of every optimizer step). Without torch.distributed it is
        the local flag.
        """
        return agree_any(self.local_flag, group)


def agree_any(flag: bool, group=None) -> bool:
    """All-reduce MAX of a boolean over ``group``: True everywhere if True anywhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


# Module-level convenience for callers that do not want to carry the object.
_active: Optional[StopSignals] = None


def install_stop_handlers(signals: Sequence[int] = STOP_SIGNALS) -> StopSignals:
    """Install SIGUSR1/SIGTERM handlers process-wide; :func:`should_stop` then reads them."""
    global _active
    if _active is None:
        _active = StopSignals(signals).install()
    return _active


def current_stop_handlers() -> Optional[StopSignals]:
    """The process-wide handlers of :func:`install_stop_handlers`, or None."""
    return _active


def restore_stop_handlers() -> None:
    """Undo :func:`install_stop_handlers`."""
    global _active
    if _active is not None:
        _active.restore()
        _active = None


def should_stop(group=None) -> bool:
    """Collective agreement on the flag of the handlers from :func:`install_stop_handlers` (False if none)."""
    return agree_any(_active.local_flag if _active is not None else False, group)
