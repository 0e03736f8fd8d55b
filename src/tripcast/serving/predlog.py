"""The prediction log: every prediction goes to the monitoring store, in the background, in batches.

Writing never blocks or fails a request: ``put`` only appends to a bounded queue. A writer thread drains it;
when the store is down, batches are appended to a local spool file (JSON lines) and replayed, in one
transaction, once the store answers again. There is one spool per store (named by a hash of its URL), so a
spool is only ever replayed into the store it was meant for, and appends and replays hold an exclusive file
lock, so several worker processes can share it. A record is only ever lost when the queue is full, and then it is
counted (``dropped``). Shadow predictions are computed here too, per batch, off the response path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tripcast.store import connect, jsonable, predictions

log = logging.getLogger(__name__)
ShadowScorer = Callable[[list[dict]], tuple[list[float], str] | None]
_DATETIME_FIELDS = ("logged_at", "pickup_datetime")


class PredictionLog:
    def __init__(self, url: str, spool_dir: Path, queue_size: int = 100_000, batch_size: int = 1_000,
                 flush_seconds: float = 0.5, shadow: ShadowScorer | None = None) -> None:
        self.url = url
        spool_dir.mkdir(parents=True, exist_ok=True)
        store_key = hashlib.sha256(url.encode()).hexdigest()[:12]
        self.spool = spool_dir / f"predictions-{store_key}.jsonl"
        self._spool_lock = spool_dir / f"predictions-{store_key}.lock"
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.shadow = shadow
        # Items are lists of records (one per request); the bound counts records, not items.
        self.queue_size = queue_size
        self._queue: queue.SimpleQueue[list[dict]] = queue.SimpleQueue()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._engine = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.store_up = True
        self.last_error: str | None = None

    # --- request side --------------------------------------------------------------------------------
    def put(self, records: list[dict]) -> None:
        """Queue a request's records; never blocks. Past the bound the records are dropped and counted."""
        with self._count_lock:
            if self._queued + len(records) > self.queue_size:
                self.dropped += len(records)
                return
            self._queued += len(records)
        self._queue.put(records)

    @property
    def depth(self) -> int:
        return self._queued

    # --- writer side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Flush what is queued (to the store, or the spool) and stop."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                self._write(batch)
            elif self.spool.exists():
                self._write([])  # nothing new: still try to replay the spool
            if self._stop.is_set() and self._queue.empty():
                return

    def _take(self) -> list[dict]:
        """Up to batch_size records, waiting at most flush_seconds after the first: few, large commits."""
        batch: list[dict] = []
        try:
            batch.extend(self._queue.get(timeout=self.flush_seconds))
            deadline = time.monotonic() + self.flush_seconds
            while len(batch) < self.batch_size and not self._stop.is_set():
                batch.extend(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            pass
        with self._count_lock:
            self._queued -= len(batch)
        return batch

    def _write(self, batch: list[dict]) -> None:
        if batch and self.shadow is not None:
            self._add_shadow(batch)
        try:
            if self._engine is None:
                self._engine = connect(self.url)
            with self._locked():
                pending = self._read_spool()
                with self._engine.begin() as conn:
                    for records in (pending, batch):
                        if records:
                            _insert(conn, records)
                if pending:
                    self.spool.unlink()
                    log.info("prediction log: replayed %d spooled records", len(pending))
            self.written += len(pending) + len(batch)
            self.store_up, self.last_error = True, None
        except Exception as exc:  # store down (SQLAlchemyError, OSError) or anything else: never lose the batch
            self.store_up, self.last_error = False, f"{type(exc).__name__}: {exc}"[:300]
            if batch:
                self._append_spool(batch)
            self._stop.wait(min(5.0, self.flush_seconds * 4))  # back off while the store is down

    def _add_shadow(self, batch: list[dict]) -> None:
        try:
            scored = self.shadow(batch)
        except Exception as exc:  # a broken challenger must not cost us the log
            log.warning("shadow scoring failed: %s", exc)
            return
        if scored is not None:
            values, version = scored
            for record, value in zip(batch, values, strict=True):
                record["shadow_prediction"], record["shadow_version"] = float(value), version

    def _append_spool(self, batch: list[dict]) -> None:
        lines = "".join(json.dumps(jsonable(r)) + "\n" for r in batch)
        with self._locked(), self.spool.open("a") as handle:
            handle.write(lines)
            handle.flush()
        self.spooled += len(batch)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._spool_lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_spool(self) -> list[dict]:
        if not self.spool.exists():
            return []
        records = []
        with self.spool.open() as handle:
            for line in handle:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line torn by a crash mid-write: count it, keep the rest
                        self.dropped += 1
                        continue
                    for key in _DATETIME_FIELDS:
                        if record.get(key):
                            record[key] = datetime.fromisoformat(record[key])
                    records.append(record)
        return records


_COLUMNS = [c.name for c in predictions.columns if c.name != "id"]


def _insert(conn, records: list[dict]) -> None:
    """Bulk insert through the driver (SQLAlchemy's per-row parameter processing would cost more than the
    database here, in a thread that shares the GIL with the request path)."""
    marker = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sqlite = conn.dialect.name == "sqlite"
    columns = ", ".join(f'"{c}"' for c in _COLUMNS)
    sql = f"INSERT INTO predictions ({columns}) VALUES ({', '.join([marker] * len(_COLUMNS))})"
    conn.exec_driver_sql(sql, [tuple(_plain(r.get(c), sqlite) for c in _COLUMNS) for r in records])


def _plain(value, sqlite: bool):
    """Values the drivers bind natively: on SQLite, datetimes as the text SQLAlchemy itself stores there;
    numpy scalars as Python numbers."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="microseconds") if sqlite else value.replace(tzinfo=None)
    return value.item() if hasattr(value, "item") else value
