"""The ride a client sends, validated the same way by the API and the stream consumer."""

import uuid
from datetime import datetime
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tripcast.features import ZONE_MAX, ZONE_MIN, local_naive

FIRST_PICKUP_YEAR, LAST_PICKUP_YEAR = 2009, 2100  # TLC records start in 2009; beyond 2262 pandas overflows
MAX_DISTANCE = 200.0  # miles; a longer "ride" is a meter error, not a request we can answer
MAX_LABEL_MINUTES = 24 * 60  # an actual duration beyond a day is a meter error, not ground truth
ZoneID = Annotated[int, Field(strict=True, ge=ZONE_MIN, le=ZONE_MAX, description="TLC taxi zone, 1..265")]


class Ride(BaseModel):
    """The course's request shape, plus an optional ride_id and pickup time."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"PULocationID": 10, "DOLocationID": 50, "trip_distance": 40}]})

    PULocationID: ZoneID
    DOLocationID: ZoneID
    trip_distance: float = Field(strict=True, ge=0, le=MAX_DISTANCE, allow_inf_nan=False, description="miles")
    ride_id: str | None = Field(None, min_length=1, max_length=128)
    pickup_datetime: datetime | None = Field(None, description="ISO 8601; naive means New York time; default now")

    @field_validator("pickup_datetime")
    @classmethod
    def plausible_pickup(cls, value: datetime | None) -> datetime | None:
        if value is not None and not FIRST_PICKUP_YEAR <= value.year <= LAST_PICKUP_YEAR:
            raise ValueError(f"must be between {FIRST_PICKUP_YEAR} and {LAST_PICKUP_YEAR}")
        return value


class Label(BaseModel):
    """Ground truth for a ride: its actual duration in minutes, or its drop-off time."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"ride_id": "green-2021-02-17", "duration": 12.5}]})

    ride_id: str = Field(min_length=1, max_length=128)
    duration: float | None = Field(None, strict=True, gt=0, le=MAX_LABEL_MINUTES, allow_inf_nan=False,
                                   description="minutes")
    dropoff_datetime: datetime | None = Field(None, description="ISO 8601; naive means New York time")

    @model_validator(mode="after")
    def one_of(self) -> "Label":
        if (self.duration is None) == (self.dropoff_datetime is None):
            raise ValueError("give exactly one of duration or dropoff_datetime")
        return self

    def row(self) -> dict:
        dropoff = local_naive(self.dropoff_datetime) if self.dropoff_datetime is not None else None
        return {"ride_id": self.ride_id, "actual_duration": self.duration, "dropoff_datetime": dropoff}


def ride_columns(rides: list[Ride]) -> tuple[tuple[np.ndarray, ...], list[str], list[datetime]]:
    """Validated rides as the columns ``Preprocessor.features`` takes (PU, DO, distance, pickup), with their
    ids and pickup times: a ride without an id gets one; one without a pickup time is picked up now."""
    ride_ids = [r.ride_id or uuid.uuid4().hex for r in rides]
    pickups = [local_naive(r.pickup_datetime) for r in rides]
    n = len(rides)
    columns = (np.fromiter((r.PULocationID for r in rides), np.int32, n),
               np.fromiter((r.DOLocationID for r in rides), np.int32, n),
               np.fromiter((r.trip_distance for r in rides), np.float64, n),
               np.array(pickups, dtype="datetime64[us]"))
    return columns, ride_ids, pickups


def log_record(ride: Ride, ride_id: str, pickup: datetime, prediction: float, version: str, arm: str,
               source: str, logged_at: datetime) -> dict:
    """One row of the prediction log (see tripcast.store.predictions)."""
    return {"ride_id": ride_id, "logged_at": logged_at, "pickup_datetime": pickup,
            "PULocationID": ride.PULocationID, "DOLocationID": ride.DOLocationID,
            "trip_distance": ride.trip_distance, "prediction": prediction, "model_version": version,
            "arm": arm, "source": source}
