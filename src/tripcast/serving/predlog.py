"""The prediction log: every answered prediction reaches the monitoring store, and none is lost on the way.

``put`` appends a request's rows (tuples in ``store.PREDICTION_COLUMNS`` order) to this process's journal
(``tripcast.serving.journal``) before the request is answered, and keeps them in memory for the writer too,
up to ``queue_size`` rows. A writer thread wakes every ``flush_seconds`` and writes everything journaled
since its last transaction, in journal order, ``batch_size`` rows per transaction: from memory when it has
the rows, else read back from the journal (the store was down, or predictions came faster than it takes them,
or a process died). Each transaction also records how far the journal is in the store (table
``journal_offsets``), so a journal left by a killed process is replayed from exactly there: nothing written
twice, nothing skipped. A file that is all in the store is removed.

Writing never blocks or fails a request. A row is lost only if the journal cannot take it (at its size limit,
``TRIPCAST_LOG_SPOOL_MAX_MB``, or a full disk), and then it is counted (``dropped``) and said in the log.
Shadow predictions are added per transaction, off the response path.

The writer wakes on a timer rather than on every ``put``: waking it per request would hand the GIL to it per
request, which costs the request path more than the writing does.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import delete, select

from tripcast.config import Settings
from tripcast.serving import journal
from tripcast.store import PREDICTION_COLUMNS, connect, insert_predictions, journal_offsets, upsert

log = logging.getLogger(__name__)
# Rows in, (shadow predictions, shadow version) out, or None when there is no model to shadow with.
ShadowScorer = Callable[[list[tuple]], tuple[list[float], str] | None]
_SHADOW = PREDICTION_COLUMNS.index("shadow_prediction")
REPLAY_ROWS = 20_000  # rows per transaction read back from a journal: ~0.3 s of work on SQLite
ROTATE_BYTES = 64 << 20  # a journal file this large is sealed and a new one started
ORPHAN_SECONDS = 30.0  # how often the writer looks for journals left by dead processes


class _Entry(NamedTuple):  # a tuple: the request path makes one per request
    segment: journal.Segment  # the request's line: [start, end) in this file
    start: int
    end: int
    rows: list[tuple]


class PredictionLog:
    def __init__(self, url: str, spool_dir: Path, queue_size: int = 100_000, batch_size: int = 20_000,
                 flush_seconds: float = 0.5, shadow: ShadowScorer | None = None, spool_max_mb: float = 2048,
                 fsync: str = "interval") -> None:
        self.url = url
        store_key = hashlib.sha256(url.encode()).hexdigest()[:12]
        self.spool_dir = spool_dir
        # One journal per store, so rows are only ever replayed into the store they were meant for. Spools of
        # earlier tripcast versions ("predictions-<store>.jsonl") are replayed like any orphan.
        self._prefixes = (f"journal-{store_key}-", f"predictions-{store_key}")
        self.journal = journal.Journal(spool_dir, self._prefixes[0], fsync, int(spool_max_mb * 1e6), ROTATE_BYTES)
        self.fsync = fsync
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.shadow = shadow
        self.queue_size = queue_size  # rows kept in memory for the writer; past it, they are read back
        self._memory: deque[_Entry] = deque()
        self._queued = 0
        self._cursor = 0  # bytes of the oldest of this process's journal files in the store
        self._lock = threading.Lock()  # journal order == memory order: appends and queueing under one lock
        self._engine = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._next_orphan_scan = 0.0
        self._next_sync = 0.0
        self.written = 0
        self.replayed = 0  # of which read back from a journal (not kept in memory, or left by a dead process)
        self.dropped = 0  # refused by the journal: lost, and counted
        self._dropped_seen = 0
        self._dropping_since: int | None = None
        self.store_up = True
        self.behind = False  # rows are waiting in the journal only, because the store did not keep up
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, shadow: ShadowScorer | None = None) -> PredictionLog:
        return cls(settings.resolved_monitoring_uri, settings.spool_dir, settings.log_queue_size,
                   settings.log_batch_size, settings.log_flush_seconds, shadow, settings.log_spool_max_mb,
                   settings.log_fsync)

    # --- request side --------------------------------------------------------------------------------
    def put(self, rows: list[tuple]) -> int:
        """Journal a request's rows (durable against this process dying once this returns); never blocks on the
        store. Returns what to pass to ``wait_durable`` (0 if the rows were dropped)."""
        with self._lock:
            try:
                segment, start = self.journal.append(rows)
            except OSError as exc:  # the journal at its limit, a full disk: counted, said by the writer
                self.dropped += len(rows)
                self.last_error = f"journal refused {len(rows)} rows: {exc}"[:300]
                return 0
            if self._queued + len(rows) <= self.queue_size:
                self._memory.append(_Entry(segment, start, self.journal.size, rows))
                self._queued += len(rows)
            return self.journal.appended

    def wait_durable(self, offset: int) -> None:
        """With ``fsync=always``: return once the journal is on the disk up to ``offset`` (a group commit)."""
        if self.fsync == "always" and offset:
            self.journal.wait_synced(offset)

    @property
    def depth(self) -> int:
        """Rows in memory, waiting for the store."""
        return self._queued

    @property
    def backlog_bytes(self) -> int:
        """Bytes of this process's journal not yet in the store."""
        return self.journal.sealed_bytes + self.journal.size - self._cursor

    def health(self) -> dict:
        return {"store_up": self.store_up, "behind": self.behind, "queued": self.depth,
                "journal_backlog_bytes": self.backlog_bytes, "written": self.written, "replayed": self.replayed,
                "dropped": self.dropped, "last_error": self.last_error}

    # --- writer side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Write what is journaled (if the store takes it) and stop. A journal all in the store is removed; else
        it stays, and the next prediction log on this store replays it."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.wait(self.flush_seconds)
                self._say_drops()
                self._sync_if_due()
                caught_up = self._drain()
                if caught_up and time.monotonic() >= self._next_orphan_scan:
                    self._replay_orphans()
                if stopping:
                    break
                if not caught_up and not self.store_up:
                    self._stop.wait(min(5.0, self.flush_seconds * 4))  # back off while the store is down
        finally:
            self._close()

    def _drain(self) -> bool:
        """Write what was journaled when the writer woke, file by file, a transaction at a time; True if all of it
        is in the store. What arrives meanwhile waits for the next wake: chasing it wrote a stream of tiny
        transactions (a quarter more CPU per request)."""
        with self._lock:
            targets = [*self.journal.sealed, (self.journal.segment, self.journal.size)]
        for segment, end in targets:
            while self._cursor < end:
                if self._stop.is_set() and not self.store_up:
                    return False
                rows, position, from_memory = self._next_batch(segment, end)
                if not self._write(segment, rows, position, from_memory):
                    return False
                self._sync_if_due()  # a long backlog must not hold back the interval's sync
            if segment is not targets[-1][0]:  # a sealed file, all in the store: the next one
                with self._lock:
                    self.journal.forget_oldest()
                    self._cursor = 0
                self._forget_offset(segment)
        return True

    def _sync_if_due(self) -> None:
        if self.fsync == "interval" and time.monotonic() >= self._next_sync:
            self._next_sync = time.monotonic() + self.flush_seconds
            if self.journal.synced < self.journal.appended:
                self.journal.sync()

    def _next_batch(self, segment: journal.Segment, end: int) -> tuple[list, int, int]:
        """The next transaction's rows, in journal order from the cursor: from memory where the writer has them,
        read back from the file where it does not. Returns (rows, offset after them, rows taken from memory)."""
        rows: list = []
        position, from_memory = self._cursor, 0
        while position < end and len(rows) < self.batch_size:
            with self._lock:
                memory = self._memory
                while memory and memory[0].segment is segment and memory[0].end <= position:  # read back already
                    self._queued -= len(memory.popleft().rows)
                while memory and memory[0].segment is segment and memory[0].start == position \
                        and len(rows) < self.batch_size:
                    entry = memory.popleft()
                    self._queued -= len(entry.rows)
                    rows.extend(entry.rows)
                    position, from_memory = entry.end, from_memory + len(entry.rows)
                gap_end = min(memory[0].start, end) if memory and memory[0].segment is segment else end
            if position < gap_end and len(rows) < self.batch_size:
                read, position = segment.read(position, gap_end, self.batch_size - len(rows))
                rows.extend(read)
                if not self.behind and self.store_up:  # said once per spell, and when it has caught up
                    log.warning("prediction log: predictions come faster than the store takes them; rows past the "
                                "queue (%d) wait in the journal in %s and are written as the store catches up",
                                self.queue_size, self.spool_dir)
                    self.behind = True
        return rows, position, from_memory

    def _write(self, segment: journal.Segment, rows: list, position: int, from_memory: int) -> bool:
        """Rows into the store, and how far their journal file is in it, in one transaction."""
        try:
            if self._engine is None:
                self._engine = connect(self.url)
            if rows and self.shadow is not None:
                rows = self._add_shadow(rows)
            with self._engine.begin() as conn:
                insert_predictions(conn, rows)
                upsert(conn, journal_offsets, [{"journal": segment.name, "position": position}], ["journal"])
        except Exception as exc:  # store down (SQLAlchemyError, OSError) or anything else: the rows stay journaled
            if self.store_up:  # said once per outage; /ready, /model and /metrics say it while it lasts
                log.warning("prediction log: store unavailable, predictions wait in the journal in %s until it "
                            "answers: %s", self.spool_dir, f"{type(exc).__name__}: {exc}"[:300])
            self.store_up, self.last_error = False, f"{type(exc).__name__}: {exc}"[:300]
            return False
        self._cursor = position
        self.written += len(rows)
        self.replayed += len(rows) - from_memory
        if not self.store_up:
            log.warning("prediction log: the store answers again (journaled predictions are written)")
        if self.behind and not self.backlog_bytes:
            log.warning("prediction log: the store has caught up (the journal is written)")
            self.behind = False
        self.store_up, self.last_error = True, None
        return True

    def _forget_offset(self, segment: journal.Segment) -> None:
        """Forget a removed file's offset (after the file: the other order could replay it twice)."""
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(journal_offsets).where(journal_offsets.c.journal == segment.name))
        except Exception as exc:  # a stale offset of a removed file: harmless
            log.info("prediction log: could not forget the offset of %s: %s", segment.name, exc)

    def _replay_orphans(self) -> None:
        """Journals of dead processes (and spools of earlier versions) on this store, into it, from the offsets
        it recorded; each file is removed once it is all in the store."""
        self._next_orphan_scan = time.monotonic() + ORPHAN_SECONDS
        for segment in journal.orphans(self.spool_dir, self._prefixes):
            try:
                done = self._replay(segment)
            except Exception as exc:
                log.warning("prediction log: could not replay %s yet: %s", segment.path, exc)
                done = False
            if not done:
                segment.close()
                return
            segment.remove()
            segment.path.with_suffix(".offset").unlink(missing_ok=True)  # beside a spool of an earlier version
            self._forget_offset(segment)
            if self._stop.is_set():
                return

    def _replay(self, segment: journal.Segment) -> bool:
        if self._engine is None:
            self._engine = connect(self.url)
        with self._engine.connect() as conn:
            position = conn.execute(select(journal_offsets.c.position)
                                    .where(journal_offsets.c.journal == segment.name)).scalar()
        if position is None:
            legacy = segment.path.with_suffix(".offset")  # a spool of an earlier version keeps it beside
            position = int(legacy.read_text()) if legacy.exists() else 0
        size, total = segment.data_end(), 0
        while position < size:
            if self._stop.is_set():
                return False
            rows, after = segment.read(position, size, REPLAY_ROWS)
            if rows and self.shadow is not None:
                rows = self._add_shadow(rows)
            with self._engine.begin() as conn:
                insert_predictions(conn, rows)
                upsert(conn, journal_offsets, [{"journal": segment.name, "position": after}], ["journal"])
            position, total = after, total + len(rows)
            self.written += len(rows)
            self.replayed += len(rows)
        log.warning("prediction log: replayed %d predictions left in %s by a process that stopped", total,
                    segment.path)
        return True

    def _close(self) -> None:
        """On stop: a journal all in the store goes; one that is not stays for the next process to replay."""
        with self._lock:
            complete = not self.backlog_bytes
            if self.fsync != "off":
                self.journal.sync()
            if complete:
                self.journal.segment.remove()
            self.journal.close()
        if complete and self._engine is not None:
            self._forget_offset(self.journal.segment)
        elif not complete:
            log.warning("prediction log: stopping with %d bytes of predictions not yet in the store; they stay in "
                        "the journal in %s and are written by the next process on this store", self.backlog_bytes,
                        self.spool_dir)

    def _say_drops(self) -> None:
        """Rows the journal refused are counted on the request path; said here, once when it starts and once when
        a wake finds no new ones."""
        dropped = self.dropped
        if dropped > self._dropped_seen and self._dropping_since is None:
            log.error("prediction log: the journal refuses rows (%s); they are dropped and counted",
                      self.last_error)
            self._dropping_since = self._dropped_seen
        elif dropped == self._dropped_seen and self._dropping_since is not None:
            log.warning("prediction log: no longer dropping rows (%d dropped)", dropped - self._dropping_since)
            self._dropping_since = None
        self._dropped_seen = dropped

    def _add_shadow(self, rows: list) -> list:
        """The rows with the challenger's predictions, where they have none yet."""
        todo = [i for i, row in enumerate(rows) if row[_SHADOW + 1] is None]
        if not todo:
            return rows
        try:
            scored = self.shadow(rows if len(todo) == len(rows) else [rows[i] for i in todo])
        except Exception as exc:  # a broken challenger must not cost us the log
            log.warning("shadow scoring failed: %s", exc)
            return rows
        if scored is None:
            return rows
        values, version = scored
        rows = list(rows)
        for i, value in zip(todo, values, strict=True):
            rows[i] = (*rows[i][:_SHADOW], float(value), version)
        return rows
