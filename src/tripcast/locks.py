"""Locks that several tripcast processes (on one host, or on many sharing a PostgreSQL server) agree on.

With a PostgreSQL tracking or monitoring store, a lock is a session-level advisory lock on that database, so
that runs on different hosts exclude each other and a crashed holder's lock dies with its connection;
otherwise it is a file lock under ``TRIPCAST_HOME`` (one host, which is what the embedded profile is).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock
from filelock import Timeout as FileLockTimeout
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tripcast.config import Settings
from tripcast.errors import TripcastError

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class LockTimeout(TripcastError):
    """Another process held the lock for longer than we wait."""


def _key(name: str) -> int:
    """A signed 64-bit advisory lock key per name (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.blake2b(f"tripcast:{name}".encode(), digest_size=8).digest(), "big", signed=True)


def _postgres_url(stores: tuple[str, ...]) -> str | None:
    for url in stores:
        if url.startswith(("postgresql://", "postgresql+", "postgres://")):
            return url.replace("postgres://", "postgresql://", 1)
    return None


@contextmanager
def exclusive(name: str, settings: Settings, stores: tuple[str, ...] | None = None,
              timeout: float = 600) -> Iterator[None]:
    """Hold the lock ``name`` for the block, in the first PostgreSQL database of ``stores`` (default: the
    tracking store, then the monitoring store), else in a file; waits up to ``timeout`` s for another holder."""
    url = _postgres_url(stores or (settings.resolved_tracking_uri, settings.resolved_monitoring_uri))
    if url is None:
        path = settings.home / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(path, timeout=timeout):
                yield
        except FileLockTimeout:
            raise LockTimeout(f"another tripcast process has held {path} for over {timeout:g} s") from None
        return
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            deadline, said = time.monotonic() + timeout, False
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(name)}).scalar_one():
                conn.rollback()  # no transaction held open while waiting
                if not said:
                    log.info("waiting for another tripcast process holding the %s lock", name)
                    said = True
                if time.monotonic() > deadline:
                    raise LockTimeout(f"another tripcast process has held the {name} lock for over {timeout:g} s")
                time.sleep(POLL_SECONDS)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _key(name)})
                conn.commit()
    finally:
        engine.dispose()
