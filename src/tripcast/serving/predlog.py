"""The prediction log: every prediction goes to the monitoring store, in the background, in batches.

Writing never blocks or fails a request: ``put`` only appends a request's rows (tuples in
``store.PREDICTION_COLUMNS`` order) to a bounded in-memory list. A writer thread wakes every
``flush_seconds``, takes everything queued and inserts it; when the store is down, the rows are appended to
a local spool file (JSON lines) and replayed once the store answers again, at most ``REPLAY_ROWS`` per
transaction: a spool left by a long outage is replayed over several flushes, from an offset kept beside it
(``.offset``), never read whole into memory or inserted in one giant transaction. There is one
spool per store (named by a hash of its URL), so a spool is only ever replayed into the store it was meant
for, and appends and replays hold an exclusive file lock, so several worker processes can share it.

When predictions come faster than the store takes them (a burst of batch requests), the rows past the queue's
bound go to a second list of the same size, which the writer moves to the spool between its transactions:
appending a row costs a small fraction of inserting it, so the log keeps up with bursts the store cannot, and
the store catches up as the spool is replayed. A row is only ever lost when both lists are full, or when the
spool cannot take it (at its size limit, or a full disk), and then it is counted (``dropped``). Shadow
predictions are computed here too, per batch, off the response path; for rows that went to the spool under
overload, as they are replayed.

The writer wakes on a timer rather than on every ``put``: waking it per request would hand the GIL to it per
request, which costs the request path more than the writing does.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import chain
from pathlib import Path

import orjson

from tripcast.config import Settings
from tripcast.store import PREDICTION_COLUMNS, connect, insert_predictions, log_time

log = logging.getLogger(__name__)
# Rows in, (shadow predictions, shadow version) out, or None when there is no model to shadow with.
ShadowScorer = Callable[[list[tuple]], tuple[list[float], str] | None]
_SHADOW = PREDICTION_COLUMNS.index("shadow_prediction")
# Spooled rows replayed per transaction, with the new rows of that write: ~0.3 s of work on SQLite.
REPLAY_ROWS = 20_000


class PredictionLog:
    def __init__(self, url: str, spool_dir: Path, queue_size: int = 100_000, batch_size: int = 20_000,
                 flush_seconds: float = 0.5, shadow: ShadowScorer | None = None, spool_max_mb: float = 2048) -> None:
        self.url = url
        self.spool_max_bytes = int(spool_max_mb * 1e6)  # a long outage, or overload, must not fill the disk
        spool_dir.mkdir(parents=True, exist_ok=True)
        store_key = hashlib.sha256(url.encode()).hexdigest()[:12]
        self.spool = spool_dir / f"predictions-{store_key}.jsonl"
        self._spool_lock = spool_dir / f"predictions-{store_key}.lock"
        self._spool_offset = spool_dir / f"predictions-{store_key}.offset"  # bytes of the spool already replayed
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.shadow = shadow
        self.queue_size = queue_size  # in rows
        self._pending: list[list[tuple]] = []
        self._queued = 0
        self._overflow: list[list[tuple]] = []  # rows past the queue's bound, on their way to the spool
        self._overflowed = 0
        self._lock = threading.Lock()
        self._engine = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self.refused = 0  # of which refused by ``put``, both lists being full
        self._refused_seen = 0
        self._refusing_since: int | None = None  # ``refused`` when the spell of refusals began
        self.store_up = True
        self.behind = False  # rows have gone to the spool because the store did not keep up
        self._spool_failing = False
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, shadow: ShadowScorer | None = None) -> PredictionLog:
        return cls(settings.resolved_monitoring_uri, settings.spool_dir, settings.log_queue_size,
                   settings.log_batch_size, settings.log_flush_seconds, shadow, settings.log_spool_max_mb)

    # --- request side --------------------------------------------------------------------------------
    def put(self, rows: list[tuple]) -> None:
        """Queue a request's rows; never blocks. Past the queue's bound they wait for the spool instead; past
        that one too, they are dropped and counted."""
        with self._lock:
            if self._queued + len(rows) <= self.queue_size:
                self._queued += len(rows)
                self._pending.append(rows)
            elif self._overflowed + len(rows) <= self.queue_size:
                self._overflowed += len(rows)
                self._overflow.append(rows)
            else:
                self.dropped += len(rows)
                self.refused += len(rows)

    @property
    def depth(self) -> int:
        """Rows in memory, waiting for the store or the spool."""
        return self._queued + self._overflowed

    # --- writer side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Flush what is queued (to the store, or the spool) and stop."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.flush_seconds)
            self._say_refusals()
            self._spill()
            with self._lock:
                taken, self._pending = self._pending, []
            rows = list(chain.from_iterable(taken))
            if rows and self.shadow is not None:
                rows = self._add_shadow(rows)
            chunks = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            if not chunks and self.spool.exists():
                chunks = [[]]  # nothing new: still try to replay the spool
            down = False
            for k, chunk in enumerate(chunks):
                if not self._write(chunk):  # the store is down: spool the rest too, without knocking again
                    rest = list(chain.from_iterable(chunks[k + 1:]))
                    if rest:
                        self._spool_or_count(rest)
                    down = True
                    break
                self._spill()  # what overflowed during that transaction
            with self._lock:
                self._queued -= len(rows)
            if stopping:
                self._spill()
                return
            if down:
                self._stop.wait(min(5.0, self.flush_seconds * 4))  # back off while the store is down
                continue
            # Nothing new came in meanwhile: catch up on the spool now, not one transaction per wake.
            while not (self._pending or self._overflow or self._stop.is_set()) and self.spool.exists():
                if not self._write([]):
                    break

    def _say_refusals(self) -> None:
        """Rows refused by ``put`` are counted there (on the request path); said here, once when it starts and
        once when a wake finds no new refusals."""
        refused = self.refused
        if refused > self._refused_seen and self._refusing_since is None:
            log.error("prediction log: predictions come faster than the store and the spool together take them; "
                      "rows past both bounds (%d rows each) are dropped and counted", self.queue_size)
            self._refusing_since = self._refused_seen
        elif refused == self._refused_seen and self._refusing_since is not None:
            log.warning("prediction log: no longer dropping rows (%d dropped)", refused - self._refusing_since)
            self._refusing_since = None
        self._refused_seen = refused

    def _spill(self) -> None:
        """Rows past the queue's bound into the spool, to be replayed as the store catches up."""
        with self._lock:
            taken, self._overflow = self._overflow, []
        if not taken:
            return
        # Without shadow predictions: they cost as much as the rows' own scoring, and are added as the rows are
        # replayed, when the store has caught up.
        rows = list(chain.from_iterable(taken))
        if self.store_up:  # (while the store is down, this is part of the outage, which is said already)
            if not self.behind:  # said once per spell, and once when it has caught up
                log.warning("prediction log: predictions come faster than the store takes them; rows past the "
                            "queue (%d) go to %s and are written as the store catches up", self.queue_size,
                            self.spool)
            self.behind = True
        self._spool_or_count(rows)
        with self._lock:
            self._overflowed -= len(rows)

    def _write(self, rows: list[tuple]) -> bool:
        """Rows, and the next part of any spool, into the store in one transaction; if that fails, rows into
        the spool."""
        try:
            if self._engine is None:
                self._engine = connect(self.url)
            with self._locked():
                # While more than this transaction waits in memory, the spool is not read back: replaying it then
                # only moves rows through it twice, and the backlog in memory is what overflows.
                hot = self._overflowed or self._queued > 2 * self.batch_size
                pending, replayed_to = ([], None) if hot else self._read_spool(REPLAY_ROWS)
                if pending and self.shadow is not None:
                    pending = self._add_shadow(pending)
                with self._engine.begin() as conn:
                    insert_predictions(conn, pending + rows)
                if replayed_to is not None:
                    self._spool_replayed(replayed_to)
                    log.info("prediction log: replayed %d spooled rows", len(pending))
            self.written += len(pending) + len(rows)
            self.replayed += len(pending)
            if self.behind and not self.spool.exists():  # replayed by this process or another worker
                log.warning("prediction log: the store has caught up (the spool is replayed)")
                self.behind = False
            if not self.store_up:
                log.warning("prediction log: the store answers again (spooled rows are replayed)")
            self.store_up, self.last_error = True, None
            return True
        except Exception as exc:  # store down (SQLAlchemyError, OSError) or anything else: never lose the rows
            if self.store_up:  # said once per outage; /model and /metrics keep counting
                log.warning("prediction log: store unavailable, rows go to %s until it answers: %s", self.spool,
                            f"{type(exc).__name__}: {exc}"[:300])
            self.store_up, self.last_error = False, f"{type(exc).__name__}: {exc}"[:300]
            if rows:
                self._spool_or_count(rows)
            return False

    def _spool_or_count(self, rows: list[tuple]) -> None:
        """Rows the store did not take, into the spool; if even that fails (the spool at its size limit, a full
        or read-only disk), they are counted as dropped, and the writer carries on: it must outlive the outage to
        log what comes after."""
        try:
            self._append_spool(rows)
        except OSError as exc:
            self.dropped += len(rows)
            self.last_error = f"spool unwritable, {len(rows)} rows dropped: {exc}"[:300]
            if not self._spool_failing:  # said once, until the spool takes rows again
                log.error("prediction log: %s", self.last_error)
            self._spool_failing = True
            return
        if self._spool_failing:
            log.warning("prediction log: the spool takes rows again")
        self._spool_failing = False

    def _add_shadow(self, rows: list[tuple]) -> list[tuple]:
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

    def _append_spool(self, rows: list[tuple]) -> None:
        lines = b"".join(orjson.dumps(row) + b"\n" for row in rows)  # a quarter of json's CPU
        with self._locked(), self.spool.open("ab+") as handle:
            # A crash mid-append leaves a line without its end; end it, or the first row appended here would
            # join it and be lost with it (replay counts the torn line once and keeps the rest).
            end = handle.seek(0, os.SEEK_END)
            if end + len(lines) > self.spool_max_bytes:
                raise SpoolFullError(f"the spool {self.spool} would pass its limit of "
                                     f"{self.spool_max_bytes / 1e6:g} MB (TRIPCAST_LOG_SPOOL_MAX_MB)")
            if end:
                handle.seek(end - 1)
                if handle.read(1) != b"\n":
                    lines = b"\n" + lines  # in append mode every write goes to the end, wherever we read
            handle.write(lines)
            handle.flush()
        self.spooled += len(rows)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._spool_lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_spool(self, limit: int) -> tuple[list[tuple], int | None]:
        """Up to ``limit`` spooled rows after the offset already replayed, and the offset after them (None:
        no spool)."""
        if not self.spool.exists():
            return [], None
        start = int(self._spool_offset.read_text()) if self._spool_offset.exists() else 0
        rows: list[tuple] = []
        with self.spool.open("rb") as handle:
            handle.seek(start)
            while len(rows) < limit and (line := handle.readline()):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                    except ValueError:  # a line torn by a crash mid-write: count it, keep the rest
                        self.dropped += 1
                        continue
                    rows.append(_spooled_row(row))
            return rows, handle.tell()

    def _spool_replayed(self, offset: int) -> None:
        """Record that the spool is in the store up to ``offset``; a spool replayed to its end is removed."""
        if offset >= self.spool.stat().st_size:
            # Offset first: a crash in between replays the spool twice, where the other order would apply a
            # stale offset to the next spool and skip its rows.
            self._spool_offset.unlink(missing_ok=True)
            self.spool.unlink()
        else:
            partial = self._spool_offset.with_suffix(".offset-tmp")
            partial.write_text(str(offset))
            partial.replace(self._spool_offset)  # atomic: a crash leaves the old offset or the new one


class SpoolFullError(OSError):
    """The spool is at its size limit: like a full disk, but before the disk is."""


def _spooled_row(row: list | dict) -> tuple:
    """A spooled row; spools written by tripcast 0.1 hold one JSON object per row, with ISO 8601 times."""
    if isinstance(row, list):
        return tuple(row)
    for key in ("logged_at", "pickup_datetime"):
        if row.get(key):
            row[key] = log_time(datetime.fromisoformat(row[key]))
    return tuple(row.get(c) for c in PREDICTION_COLUMNS)
