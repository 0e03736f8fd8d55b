"""Batch scoring on a Dask cluster: each piece of a month is scored where it is read and written as a part, in a
hidden staging folder; once every part is there, the folder is renamed to the month's name. On a cluster a month is
thus a folder of parquet parts (a dataset: ``pd.read_parquet`` reads it whole, in ride order), not one file:
joining them would put every row through one process again.

A part has a fixed name (the row its piece starts at) and is itself written atomically, so a task run again after
its worker died rewrites its part, never adds one: a month holds each of its rides exactly once, or is not there.
"""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from distributed import Client

from tripcast import batch
from tripcast.cluster.data import Filter, Piece, clean_piece, pieces
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.features import DropReport
from tripcast.files import atomic_path, replace
from tripcast.models import TripDurationPipeline


def staging_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.parts")


def for_workers(pipeline: TripDurationPipeline, threads: int) -> TripDurationPipeline:
    """A copy that predicts with a worker's threads: two workers of two LightGBM threads each on two cores ran
    at two thirds of the speed of one process."""
    copy = pickle.loads(pickle.dumps(pipeline))
    if hasattr(copy.estimator, "threads"):
        copy.estimator.threads = threads
    return copy


def score_piece(piece: Piece, pipeline: TripDurationPipeline, version: str, staging: str) -> DropReport:
    rides, drops = clean_piece(piece, Filter(), with_ids=True)
    part = Path(staging) / f"part-{piece.first_row:012d}.parquet"
    with atomic_path(part) as tmp:
        batch.score_rides(rides, pipeline, version).to_parquet(tmp, index=False)
    return drops


def publish(staging: Path, path: Path) -> int:
    """The staging folder becomes the month (replacing an earlier output, file or folder). Returns the rows."""
    rows = sum(pq.ParquetFile(part).metadata.num_rows for part in staging.glob("part-*.parquet"))
    replace(staging, path)
    return rows


def score_months(client: Client, color: str, months: list[tlc.Month], pipeline: TripDurationPipeline, version: str,
                 settings: Settings) -> list[dict[str, Any]]:
    """Score every month's pieces on the cluster (all months at once); each month appears once all its parts do."""
    started = time.perf_counter()
    shared = client.scatter(for_workers(pipeline, min(client.nthreads().values())), broadcast=True)
    submitted = []
    for month in months:
        path = batch.output_path(color, month, settings)
        staging = staging_dir(path)
        shutil.rmtree(staging, ignore_errors=True)  # parts of an interrupted run: this run writes its own
        staging.mkdir(parents=True)
        month_pieces = pieces(color, [month], settings)
        futures = client.map(score_piece, month_pieces, pipeline=shared, version=version, staging=str(staging),
                             pure=False)
        submitted.append((month, path, staging, futures))
    results = []
    try:
        for month, path, staging, futures in submitted:
            drops = client.gather(futures)
            rows = publish(staging, path)
            seconds = time.perf_counter() - started
            skipped = sum(d.rows_in - d.rows_out for d in drops)
            results.append({"month": str(month), "rows": rows, "skipped": skipped, "seconds": round(seconds, 3),
                            "rows_per_second": round(rows / seconds), "path": str(path)})
    finally:  # a month not written leaves no parts behind
        for _, _, staging, futures in submitted:
            client.cancel(futures)
            shutil.rmtree(staging, ignore_errors=True)
    return results
