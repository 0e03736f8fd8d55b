"""The journal: answered predictions made durable before the answer leaves the process.

Each process appends to its own file, ``journal-<store>-<pid>-<token>.jsonl``, one JSON line per request (its
prediction-log rows), with one ``write`` before the request is answered: from then on the rows are the
kernel's, and a SIGKILL or an OOM kill of the process cannot lose them. ``fsync`` decides when they also reach
the disk: ``off`` (the OS decides; a power cut may lose the last seconds), ``interval`` (the log writer syncs
at every wake) or ``always`` (an answer waits for its sync; concurrent requests share one: a group commit).

The writing process holds an exclusive ``flock`` on its file while it lives; a file nobody holds is an orphan,
left by a process that died, and any prediction log on the same store replays it (``orphans``) from the offset
its store recorded, in the same transactions as the rows, so that no row is written twice or skipped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import suppress
from datetime import datetime
from pathlib import Path

import orjson

from tripcast.store import PREDICTION_COLUMNS, log_time


class JournalFull(OSError):
    """The journal is at its size limit: like a full disk, but before the disk is."""


class Segment:
    """One journal file, open for reading; its rows between byte offsets, a line (a request) at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self._reader = path.open("rb")

    def read(self, start: int, stop: int, limit: int) -> tuple[list, int]:
        """Rows of the lines in [start, stop), whole lines up to about ``limit`` rows; and where they end. A line
        torn by a crash mid-write (a request that was never answered) is skipped."""
        rows: list = []
        self._reader.seek(start)
        position = start
        while position < stop and len(rows) < limit:
            line = self._reader.readline(stop - position)
            if not line:
                break
            position += len(line)
            if line.endswith(b"\n"):
                rows.extend(parse_line(line))
        return rows, position

    def size(self) -> int:
        return os.fstat(self._reader.fileno()).st_size

    def close(self) -> None:
        self._reader.close()


class Journal:
    """This process's journal file: ``append`` before answering, ``sync`` / ``wait_synced`` for the disk."""

    def __init__(self, folder: Path, prefix: str, fsync: str, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.prefix, self.fsync, self.max_bytes = folder, prefix, fsync, max_bytes
        self._synced_cond = threading.Condition()
        self._syncing = False
        self._open()

    def _open(self) -> None:
        path = self.folder / f"{self.prefix}{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # held while this process lives: the file is not an orphan
        self.segment = Segment(path)
        self.size = 0  # bytes appended; the callers serialise appends (PredictionLog's lock)
        self.synced = 0

    @property
    def name(self) -> str:
        return self.segment.name

    def append(self, rows: list[tuple]) -> int:
        """Append a request's rows as one line; returns the journal's size after it. Raises OSError (JournalFull
        at the size limit, ENOSPC...) having written nothing: a failed write is cut back off."""
        data = orjson.dumps(rows, option=orjson.OPT_APPEND_NEWLINE)
        if self.size + len(data) > self.max_bytes:
            raise JournalFull(errno.EFBIG, f"the journal {self.segment.path} is at its limit of "
                                           f"{self.max_bytes / 1e6:g} MB (TRIPCAST_LOG_SPOOL_MAX_MB)")
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:] if done else data)
        except OSError:
            if done:
                os.ftruncate(self.fd, self.size)  # no half line: the next append starts clean
            raise
        self.size += len(data)
        return self.size

    def sync(self) -> None:
        """Everything appended so far onto the disk (the writer's wake, with ``fsync=interval``)."""
        self.wait_synced(self.size)

    def wait_synced(self, offset: int) -> None:
        """Return once the journal is on the disk up to ``offset``. Callers that arrive while a sync runs wait
        for the next one, which covers them all: one fsync per group of requests, not one each."""
        with self._synced_cond:
            while self.synced < offset:
                if self._syncing:
                    self._synced_cond.wait()
                    continue
                self._syncing, target = True, self.size
                self._synced_cond.release()
                try:
                    os.fsync(self.fd)
                finally:
                    self._synced_cond.acquire()
                    self._syncing = False
                    self.synced = max(self.synced, target)
                    self._synced_cond.notify_all()

    def rotate(self) -> Segment:
        """Start a new file; returns the old segment (its lock released) for the caller to delete once stored."""
        old, old_fd = self.segment, self.fd
        self._open()
        os.close(old_fd)
        return old

    def close(self) -> None:
        """Release the file: from now on it is an orphan that any prediction log on this store replays."""
        self.segment.close()
        os.close(self.fd)


def orphans(folder: Path, prefixes: tuple[str, ...], own: str) -> Iterator[tuple[Segment, int]]:
    """Journal files of these prefixes that no live process holds, each locked for the caller while it replays
    it (yielded with the lock's file descriptor; ``release`` it after)."""
    for path in sorted(p for prefix in prefixes for p in folder.glob(f"{prefix}*.jsonl")):
        if path.name == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # replayed and removed by another process meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer lives, or another process replays it
            os.close(fd)
            continue
        if not path.exists():
            os.close(fd)
            continue
        yield Segment(path), fd


def release(segment: Segment, fd: int, remove: bool) -> None:
    segment.close()
    if remove:
        with suppress(FileNotFoundError):
            segment.path.unlink()
    os.close(fd)


def parse_line(line: bytes) -> list:
    """A journal line's rows. Spools of earlier tripcast versions hold a row per line (a list), or, before
    that, a JSON object per row with ISO 8601 times; both are read as well."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return []  # torn by a crash mid-write: that request was never answered
    if isinstance(value, dict):
        for key in ("logged_at", "pickup_datetime"):
            if value.get(key):
                value[key] = log_time(datetime.fromisoformat(value[key]))
        return [[value.get(c) for c in PREDICTION_COLUMNS]]
    if value and not isinstance(value[0], list):
        return [value]
    return value
