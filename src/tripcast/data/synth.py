"""Synthetic months for scale tests and benchmarks: real rides resampled, in the TLC schema of their colour.

Only a few green months exist here, and a month of yellow or high-volume FHV holds millions of rides. A synthetic
month draws rides (with replacement) from a real one, moves each pickup by up to five minutes, stretches its
duration by a few per cent and its distance likewise, and keeps every other column of the drawn ride. Its colour
is ``synth-<colour>`` (file ``synth-green_tripdata_2021-01.parquet``, cache folder ``synth-green``) and its parquet
metadata says where it came from, so it cannot be taken for the TLC's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import Progress

from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import DataError
from tripcast.files import atomic_path

ROW_GROUP = 250_000  # rides per row group: a cluster reads a month in pieces of whole row groups
JITTER_SECONDS = 300
STRETCH = 0.03  # standard deviation of the relative change in duration and distance


def synthesize(color: str, like: tlc.Month, rides: int, out: Path, settings: Settings,
               month: tlc.Month | None = None, seed: int = 0) -> Path:
    """Write ``rides`` rides resampled from ``color``'s ``like`` month as ``synth-<color>``'s ``month`` (default:
    ``like``) into ``out``; returns the file. Written whole or not at all."""
    if color.startswith(tlc.SYNTHETIC):
        raise DataError(f"{color!r} is already synthetic: resample a TLC colour (green, yellow, fhv, fhvhv)")
    if rides < 1:
        raise DataError(f"--rides {rides}: at least one ride")
    month = month or like
    schema = tlc.schema_of(color)
    pickup, dropoff = (raw for raw, canonical in schema.items() if canonical.endswith("_datetime"))
    distance = next((raw for raw, canonical in schema.items() if canonical == "trip_distance"), None)
    source = pq.read_table(tlc.fetch(color, like, settings))
    times = [source[name].cast(pa.timestamp("us")) for name in (pickup, dropoff)]
    source = source.set_column(source.schema.get_field_index(pickup), pickup, times[0])
    source = source.set_column(source.schema.get_field_index(dropoff), dropoff, times[1])
    inside = pc.and_(pc.greater_equal(times[0], pa.scalar(like.start.to_datetime64(), pa.timestamp("us"))),
                     pc.less(times[0], pa.scalar(like.end.to_datetime64(), pa.timestamp("us"))))
    source = source.filter(inside)  # rides of the month itself: their times map into the target month
    if source.num_rows == 0:
        raise DataError(f"{color} {like} has no rides with a pickup inside the month to resample")
    name = f"{tlc.SYNTHETIC}{color}"
    path = out / tlc.file_name(name, month)
    note = {"tripcast.synthetic": f"{rides} rides resampled from the TLC's {color} {like} by tripcast data synth "
                                  f"(seed {seed}): not TLC data"}
    schema_out = source.schema.with_metadata((source.schema.metadata or {}) | {
        k: json.dumps(v) for k, v in note.items()})
    rng = np.random.default_rng(seed)
    like_span = (like.end - like.start).to_timedelta64().astype("timedelta64[us]").astype(np.int64)
    span = (month.end - month.start).to_timedelta64().astype("timedelta64[us]").astype(np.int64)
    start_us = np.datetime64(month.start.to_datetime64(), "us").astype(np.int64)
    like_us = np.datetime64(like.start.to_datetime64(), "us").astype(np.int64)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema_out) as writer, \
            Progress(transient=True, disable=not settings.progress) as progress:
        task = progress.add_task(f"synthesize {path.name}", total=rides)
        for begin in range(0, rides, ROW_GROUP):
            n = min(ROW_GROUP, rides - begin)
            chunk = source.take(pa.array(rng.integers(0, source.num_rows, n)))
            start = chunk[pickup].cast(pa.int64()).to_numpy(zero_copy_only=False)
            end = pc.fill_null(chunk[dropoff], chunk[pickup]).cast(pa.int64()).to_numpy(zero_copy_only=False)
            offset = ((start - like_us) * (span / like_span)).astype(np.int64) \
                + rng.integers(-JITTER_SECONDS, JITTER_SECONDS, n) * 10**6
            new_start = start_us + np.clip(offset, 0, span - 1)
            new_end = new_start + ((end - start) * rng.normal(1, STRETCH, n)).astype(np.int64)
            chunk = chunk.set_column(chunk.schema.get_field_index(pickup), pickup,
                                     pa.array(new_start, pa.int64()).cast(pa.timestamp("us")))
            chunk = chunk.set_column(chunk.schema.get_field_index(dropoff), dropoff,
                                     pa.array(new_end, pa.int64()).cast(pa.timestamp("us")))
            if distance is not None:
                miles = chunk[distance].cast(pa.float64()).to_numpy(zero_copy_only=False)
                stretched = np.round(np.abs(miles * rng.normal(1, STRETCH, n)), 2)
                chunk = chunk.set_column(chunk.schema.get_field_index(distance), distance,
                                         pa.array(stretched).cast(chunk.schema.field(distance).type))
            writer.write_table(chunk.replace_schema_metadata(schema_out.metadata), row_group_size=ROW_GROUP)
            progress.advance(task, n)
    return path
