"""Ctrl-C and SIGTERM in a command: an ``Interrupted`` raised at once in the main thread, and raised again at the
next safe point (``check``) where a library swallowed it: Prefect drops a BaseException that arrives while it
winds up a finished run, and the command then ran on to its end."""

from __future__ import annotations

import signal
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
    raise Interrupted


def check() -> None:
    """Raise ``Interrupted`` if one was asked for: call between steps (a flow, a window of a replay)."""
    if _requested.is_set():
        raise Interrupted
