"""The journal: answered predictions made durable before the answer leaves the process.

Each process appends to its own file, ``journal-<store>-<pid>-<token>.jsonl``, one JSON line per request (its
prediction-log rows), before the request is answered. The file is allocated ahead and mapped into memory, so an
append is a copy into the page cache: no system call, and no release of the GIL for the log's writer thread to
take (a ``write`` per request cost ~5 % of the API's CPU, mostly in that hand-off). From then on the rows are
the kernel's: a SIGKILL or an OOM kill of the process cannot lose them. ``fsync`` decides when they also reach
the disk: ``off`` (the OS decides; a power cut may lose the last seconds), ``interval`` (the log writer syncs
at every wake) or ``always`` (an answer waits for its sync; concurrent requests share one: a group commit).

The writing process holds an exclusive ``flock`` on its file while it lives; a file nobody holds is an orphan,
left by a process that died, and any prediction log on the same store replays it (``orphans``) from the offset
its store recorded, in the same transactions as the rows, so that no row is written twice or skipped. A
file's data ends at its first NUL byte (JSON lines hold none; the rest of an allocated file is zeros).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import orjson

from tripcast.store import PREDICTION_COLUMNS, log_time


class JournalFull(OSError):
    """The journal is at its size limit: like a full disk, but before the disk is."""


class Segment:
    """One journal file, open for reading; its rows between byte offsets, a line (a request) at a time. While
    ``lock_fd`` is open, its exclusive lock says a live process answers for the file."""

    def __init__(self, path: Path, lock_fd: int | None = None) -> None:
        self.path = path
        self.name = path.name
        self.lock_fd = lock_fd
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

    def data_end(self) -> int:
        """Where the file's data ends: its first NUL byte, or its end."""
        size = os.fstat(self._reader.fileno()).st_size
        if not size:
            return 0
        with mmap.mmap(self._reader.fileno(), size, access=mmap.ACCESS_READ) as view:
            end = view.find(b"\0")
        return size if end < 0 else end

    def remove(self) -> None:
        """Delete the file, then let go of its lock (the other order could let another process replay it)."""
        self.path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        self._reader.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class Journal:
    """This process's journal: ``append`` before answering, ``sync`` / ``wait_synced`` for the disk. A file is
    allocated ``rotate_bytes`` at a time; a full one is sealed (cut to its data) and a new one started, and the
    writer removes sealed files once they are in the store, so a journal under steady load never grows without
    end. Its files together stop at ``max_bytes``."""

    def __init__(self, folder: Path, prefix: str, fsync: str, max_bytes: int, rotate_bytes: int = 64 << 20) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.prefix, self.fsync = folder, prefix, fsync
        self.max_bytes, self.rotate_bytes = max_bytes, rotate_bytes
        self.sealed: deque[tuple[Segment, int]] = deque()  # files written whole, oldest first, with their sizes
        self.sealed_bytes = 0
        self.appended = self.synced = 0  # bytes appended to all of its files, and of those on the disk
        self._synced_cond = threading.Condition()
        self._syncing = False
        self._open(rotate_bytes)

    def _open(self, capacity: int) -> None:
        path = self.folder / f"{self.prefix}{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is removed: it is not an orphan
            # Blocks reserved now: a full disk is an error here, not a SIGBUS at a later copy into the mapping.
            os.posix_fallocate(fd, 0, capacity)
            self._map = mmap.mmap(fd, capacity)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.fd, self.capacity = fd, capacity
        self.segment = Segment(path, lock_fd=fd)
        self.size = 0  # bytes appended to this file; the callers serialise appends (PredictionLog's lock)

    def append(self, rows: list[tuple]) -> tuple[Segment, int]:
        """Append a request's rows as one line; returns the file and the offset it starts at (the file's size is
        where it ends). Raises OSError (JournalFull at the size limit, ENOSPC...) having written nothing."""
        data = orjson.dumps(rows, option=orjson.OPT_APPEND_NEWLINE)
        if self.sealed_bytes + self.size + len(data) > self.max_bytes:
            raise JournalFull(errno.EFBIG, f"the journal in {self.folder} is at its limit of "
                                           f"{self.max_bytes / 1e6:g} MB (TRIPCAST_LOG_SPOOL_MAX_MB)")
        if self.size + len(data) > self.capacity:
            self._seal(max(self.rotate_bytes, len(data)))
        start = self.size
        self._map[start:start + len(data)] = data
        self.size += len(data)
        self.appended += len(data)
        return self.segment, start

    def _seal(self, capacity: int) -> None:
        """Cut this file to its data (synced first) and start a new one."""
        if self.fsync != "off":
            self.sync()
        old, size, mapped = self.segment, self.size, self._map
        self._open(capacity)  # first: if it fails, this file stays the one appended to
        mapped.close()
        os.ftruncate(old.lock_fd, size)  # a reader then needs no NUL to find its end
        self.sealed.append((old, size))
        self.sealed_bytes += size

    def forget_oldest(self) -> Segment:
        """Remove the oldest sealed file (it is all in the store); returns it."""
        segment, size = self.sealed.popleft()
        self.sealed_bytes -= size
        segment.remove()
        return segment

    def sync(self) -> None:
        """Everything appended so far onto the disk (the writer's wake, with ``fsync=interval``)."""
        self.wait_synced(self.appended)

    def wait_synced(self, appended: int) -> None:
        """Return once the first ``appended`` bytes are on the disk. Callers that arrive while a sync runs wait for
        the next one, which covers them all: one fsync per group of requests, not one each."""
        with self._synced_cond:
            while self.synced < appended:
                if self._syncing:
                    self._synced_cond.wait()
                    continue
                # Earlier files were synced whole when they were sealed: this one covers all that is appended.
                self._syncing, target, fd = True, self.appended, self.fd
                self._synced_cond.release()
                try:
                    os.fsync(fd)  # pages written through the mapping are the file's dirty pages
                finally:
                    self._synced_cond.acquire()
                    self._syncing = False
                    self.synced = max(self.synced, target)
                    self._synced_cond.notify_all()

    def close(self) -> None:
        """Release the files: from now on they are orphans that any prediction log on this store replays."""
        if not self._map.closed:
            self._map.close()
            if self.segment.lock_fd is not None:
                os.ftruncate(self.segment.lock_fd, self.size)
        for segment, _ in self.sealed:
            segment.close()
        self.segment.close()


def orphans(folder: Path, prefixes: tuple[str, ...]) -> Iterator[Segment]:
    """Journal files of these prefixes that no live process holds, each locked for the caller while it replays
    it (``remove`` it once replayed, ``close`` it otherwise)."""
    for path in sorted(p for prefix in prefixes for p in folder.glob(f"{prefix}*.jsonl")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # replayed and removed by another process meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process writes it (this one, perhaps), or replays it
            os.close(fd)
            continue
        if not path.exists():
            os.close(fd)
            continue
        yield Segment(path, lock_fd=fd)


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
