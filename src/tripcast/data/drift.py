"""Drift on purpose: a TLC month rewritten with a known change, in the TLC's own schema, so that a folder of
such files can stand in for the TLC address (``TRIPCAST_TLC_MIRROR``) and a drift can be rehearsed.

- ``slower-traffic``: every ride takes ``strength`` times as long (inputs unchanged; only accuracy shows it);
- ``longer-distances``: distances and durations times ``strength`` (distance and prediction drift);
- ``zone-shift``: the busiest pickup and drop-off zones are swapped with quiet ones, durations unchanged
  (zone and zone-pair drift, and the model's zone knowledge goes wrong).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import DataError
from tripcast.files import atomic_path

DRIFTS = {"slower-traffic": 1.5, "longer-distances": 1.6, "zone-shift": 20}  # kind: default strength
REAL_ZONES = np.arange(1, 264)  # 264/265 are "unknown": left alone


def zone_swap(pickups: np.ndarray, strength: int, seed: int = 0) -> np.ndarray:
    """A lookup (index: zone) swapping the ``strength`` busiest pickup zones with as many others, at random."""
    counts = np.bincount(np.clip(pickups, 0, 265), minlength=266)
    counts[[0, 264, 265]] = -1
    busiest = np.argsort(counts)[::-1][: int(strength)]
    rest = np.setdiff1d(REAL_ZONES, busiest)
    quiet = np.random.default_rng(seed).choice(rest, size=len(busiest), replace=False)
    lookup = np.arange(266)
    lookup[busiest], lookup[quiet] = quiet, busiest
    return lookup


def inject(color: str, month: str | tlc.Month, kind: str, settings: Settings, out_dir: Path,
           strength: float | None = None, seed: int = 0) -> Path:
    """Write the drifted month to ``out_dir`` under its TLC file name (atomically); returns its path."""
    if kind not in DRIFTS:
        raise DataError(f"unknown drift {kind!r}: choose one of {', '.join(DRIFTS)}")
    month = tlc.Month.parse(month)
    strength = DRIFTS[kind] if strength is None else strength
    if strength <= 0:
        raise DataError(f"drift strength must be positive, got {strength}")
    table = pq.read_table(tlc.fetch(color, month, settings))
    raw = {canonical: name for name, canonical in tlc.schema_of(color).items()}
    pickup = table[raw["pickup_datetime"]].cast(pa.timestamp("us")).to_numpy(zero_copy_only=False)
    dropoff = table[raw["dropoff_datetime"]].cast(pa.timestamp("us")).to_numpy(zero_copy_only=False)
    changed: dict[str, np.ndarray] = {}
    if kind in ("slower-traffic", "longer-distances"):
        changed["dropoff_datetime"] = pickup + ((dropoff - pickup) * strength).astype("timedelta64[us]")
    if kind == "longer-distances" and "trip_distance" in raw:
        changed["trip_distance"] = table[raw["trip_distance"]].to_numpy(zero_copy_only=False) * strength
    if kind == "zone-shift":
        pickups = pc.fill_null(table[raw["PULocationID"]], 0).cast(pa.int64()).to_numpy()
        lookup = zone_swap(pickups, int(strength), seed)
        for column in ("PULocationID", "DOLocationID"):
            zones = table[raw[column]]
            filled = pc.fill_null(zones, 0).cast(pa.int64()).to_numpy()
            shifted = lookup[np.clip(filled, 0, 265)]
            changed[column] = np.where(filled > 265, filled, shifted)
    for canonical, values in changed.items():
        index = table.schema.get_field_index(raw[canonical])
        field = table.schema.field(index)
        original = table[raw[canonical]]
        array = pa.array(values, mask=original.is_null().to_numpy(zero_copy_only=False))
        table = table.set_column(index, field, pc.cast(array, field.type, safe=False))
    target = out_dir / tlc.file_name(color, month)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target
