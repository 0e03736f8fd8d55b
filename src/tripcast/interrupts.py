"""Ctrl-C and SIGTERM in a command: an ``Interrupted`` raised at once in the main thread, and raised again at the
next safe point (``check``) where a library swallowed it: Prefect drops a BaseException that arrives while it
winds up a finished run, and the command then ran on to its end."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

_requested = threading.Event()


class Interrupted(BaseException):
    """Not an ``Exception``, so that no handler on the way out mistakes it for a failure to retry or record; not
    the ``KeyboardInterrupt`` that click turns into "Aborted!"."""


def install() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)


def _interrupt(number: int, _frame: object) -> None:
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_DFL)  # a second one ends the process at once
    _requested.set()
    # What libraries log while they wind down is expected now, not news (asyncio's cancelled tasks, MLflow's
    # interrupted session: a 100-line traceback); the command's one line says it.
    logging.disable(logging.ERROR)
    raise Interrupted


def caused_by_signal(error: BaseException) -> bool:
    """Whether ``error`` followed from a Ctrl-C or SIGTERM: ours, or Prefect's (its handler takes SIGTERM
    during a flow run), or an error that one left behind (a crash report that failed on the way out)."""
    if _requested.is_set():
        return True
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted | KeyboardInterrupt) or type(error).__name__ == "TerminationSignal":
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def check() -> None:
    """Raise ``Interrupted`` if one was asked for: call between steps (a flow, a window of a replay)."""
    if _requested.is_set():
        raise Interrupted


def owned_child() -> None:
    """``preexec_fn`` of a child process a command owns (its API, Prefect's server): a session of its own, so
    that a terminal's Ctrl-C reaches only the command, which stops it in order; and SIGTERM when the command
    dies without stopping it (Linux; a SIGKILLed command left Prefect's server running)."""
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
