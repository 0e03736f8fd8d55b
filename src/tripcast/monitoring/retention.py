"""Retention of the prediction log: rides older than ``TRIPCAST_RETENTION_DAYS`` (by pickup time, the time
monitoring windows are cut on) leave the store for parquet files, one set per month.

The cut falls on a window's start, so every window after it is whole in the store. Rows are moved a batch at a
time, in id order: a batch's files are written whole, synced and renamed into place, and only then are its rows
deleted, in one transaction. A file is named by its month and the ids it holds, so a run that died between the
two writes the same files again instead of a second copy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine, and_, delete, select

from tripcast.files import atomic_path
from tripcast.monitoring.windows import window_of
from tripcast.store import predictions

log = logging.getLogger(__name__)
BATCH_ROWS = 200_000


@dataclass
class Archived:
    cut: datetime
    rows: int = 0
    files: list[Path] = field(default_factory=list)


def cut_for(now: datetime, retention_days: float, window: str) -> datetime:
    """Where retention cuts: the start of the window that holds ``now - retention_days``."""
    return window_of(window, now - timedelta(days=retention_days)).start


def archive_predictions(engine: Engine, folder: Path, cut: datetime, batch_rows: int = BATCH_ROWS) -> Archived:
    """Move logged predictions with a pickup before ``cut`` to ``folder/predictions-YYYY-MM-ids-A-B.parquet``."""
    done = Archived(cut)
    p = predictions.c
    while True:
        with engine.begin() as conn:
            frame = pd.read_sql(select(predictions).where(p.pickup_datetime < cut).order_by(p.id).limit(batch_rows),
                                conn)
            if frame.empty:
                return done
            frame["pickup_datetime"] = pd.to_datetime(frame["pickup_datetime"])
            frame["logged_at"] = pd.to_datetime(frame["logged_at"])
            for month, rows in frame.groupby(frame["pickup_datetime"].dt.strftime("%Y-%m"), sort=True):
                path = folder / f"predictions-{month}-ids-{rows['id'].iat[0]}-{rows['id'].iat[-1]}.parquet"
                _write_durably(rows, path)
                done.files.append(path)
            # New rows get larger ids: every row before the cut up to this batch's last id is in its files.
            deleted = conn.execute(delete(predictions).where(and_(p.pickup_datetime < cut,
                                                                  p.id <= int(frame["id"].iat[-1])))).rowcount
            if deleted != len(frame):  # another archiver moved some meanwhile: let this transaction undo
                raise RuntimeError(f"retention: {deleted} rows deleted for {len(frame)} archived; run it again")
        done.rows += len(frame)
        log.info("retention: %d rows before %s archived so far", done.rows, f"{cut:%Y-%m-%d}")


def _write_durably(rows: pd.DataFrame, path: Path) -> None:
    """Whole or not at all, and on the disk before the rows leave the store."""
    table = pa.Table.from_pandas(rows, preserve_index=False)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

