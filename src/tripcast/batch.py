"""Batch scoring: a month of rides through a registered pipeline, written atomically as parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.files import atomic_path
from tripcast.models import TripDurationPipeline

OUTPUT_COLUMNS = ["ride_id", "pickup_datetime", "PULocationID", "DOLocationID", "trip_distance",
                  "actual_duration", "predicted_duration", "diff", "model_version"]


def output_path(color: str, month: tlc.Month, settings: Settings) -> Path:
    return settings.home / "predictions" / color / f"{month}.parquet"


def score_rides(rides: pd.DataFrame, pipeline: TripDurationPipeline, version: str) -> pd.DataFrame:
    """Predictions beside the inputs and the actual duration (rides: canonical columns plus ride_id)."""
    predicted = pipeline.predict(rides)
    actual = feats.duration_minutes(rides)
    return pd.DataFrame({
        "ride_id": rides["ride_id"].to_numpy(), "pickup_datetime": rides["pickup_datetime"].to_numpy(),
        "PULocationID": rides["PULocationID"].to_numpy(), "DOLocationID": rides["DOLocationID"].to_numpy(),
        "trip_distance": rides["trip_distance"].to_numpy(), "actual_duration": actual,
        "predicted_duration": predicted, "diff": actual - predicted,
        "model_version": np.full(len(rides), version),
    }, columns=OUTPUT_COLUMNS)


def scorable_month(color: str, month: tlc.Month, settings: Settings) -> tuple[pd.DataFrame, feats.DropReport]:
    """A month's rides that a model can score: valid inputs, pickup inside the month, any duration.
    ride_id is ``<colour>-<YYYY-MM>-<row in the published file>``, stable across runs."""
    raw = tlc.read_month(color, month, settings)
    raw["ride_id"] = f"{color}-{month}-" + pd.RangeIndex(len(raw)).astype(str)
    return feats.clean(raw, -np.inf, np.inf, month.start, month.end)


def write_atomic(frame: pd.DataFrame, path: Path) -> Path:
    """Write the frame as parquet, whole or not at all."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path
