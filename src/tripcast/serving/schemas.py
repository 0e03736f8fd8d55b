"""The ride a client sends, validated the same way by the API and the stream consumer.

Rides are TypedDicts validated by pydantic straight from the JSON bytes: no model instance per ride, which
halves the cost of a 10,000-ride batch. Validated rides become columns (``RideColumns``): the model's input
and the prediction log's rows.
"""

import os
from datetime import datetime
from itertools import repeat
from typing import (
    Annotated,
    NotRequired,  # pydantic needs typing_extensions' TypedDict before 3.12
)

import numpy as np
import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from typing_extensions import TypedDict

from tripcast.features import ZONE_MAX, ZONE_MIN, Preprocessor, local_naive
from tripcast.store import log_time, log_times

# TLC records start in 2009. Outside these years pandas overflows (after 2262) or a time cannot move to New
# York time (year 1, found by the fuzz on /feedback).
FIRST_YEAR, LAST_YEAR = 2009, 2100
MAX_DISTANCE = 200.0  # miles; a longer "ride" is a meter error, not a request we can answer
MAX_LABEL_MINUTES = 24 * 60  # an actual duration beyond a day is a meter error, not ground truth


def _plausible_year(value: datetime | None) -> datetime | None:
    if value is not None and not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise ValueError(f"must be between {FIRST_YEAR} and {LAST_YEAR}")
    return value


class _ZoneSchema:
    """A TLC taxi zone: a whole number from 1 to 265, written 10 or 10.0 (JSON does not tell them apart, and
    a pandas column with a gap turns zones into floats), never "10" or true. Integers are checked in
    pydantic-core alone; only a float calls back into Python, to become an int."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type, handler: GetCoreSchemaHandler) -> CoreSchema:
        whole = core_schema.float_schema(strict=True, multiple_of=1, ge=ZONE_MIN, le=ZONE_MAX)
        return core_schema.union_schema(
            [core_schema.int_schema(strict=True, ge=ZONE_MIN, le=ZONE_MAX),
             core_schema.no_info_after_validator_function(int, whole)],
            mode="left_to_right", custom_error_type="zone_id",
            custom_error_message=f"Input should be a taxi zone: a whole number from {ZONE_MIN} to {ZONE_MAX}")

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"type": "integer", "minimum": ZONE_MIN, "maximum": ZONE_MAX, "description": "TLC taxi zone"}


ZoneID = Annotated[int, _ZoneSchema]
Distance = Annotated[float, Field(strict=True, ge=0, le=MAX_DISTANCE, allow_inf_nan=False, description="miles")]
# No control characters: PostgreSQL cannot store NUL, and a row the store refuses would block the log's spool.
RideId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
# The same years as a pattern on the text, so that the OpenAPI schema says it too (clients, the fuzz).
YEARS_PATTERN = r"^(2009|20[1-9][0-9]|2100)-"
PlausibleTime = Annotated[datetime | None, AfterValidator(_plausible_year),
                          Field(json_schema_extra={"pattern": YEARS_PATTERN})]
Pickup = Annotated[PlausibleTime, Field(description="ISO 8601; naive means New York time; default now")]


class Ride(TypedDict):
    """The course's request shape, plus an optional ride_id and pickup time."""

    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra={  # type: ignore[misc]
        "examples": [{"PULocationID": 10, "DOLocationID": 50, "trip_distance": 40}]})

    PULocationID: ZoneID
    DOLocationID: ZoneID
    trip_distance: Distance
    ride_id: NotRequired[RideId | None]
    pickup_datetime: NotRequired[Pickup]


RIDE = TypeAdapter(Ride)


def ride_batch(limit: int) -> TypeAdapter:
    """``{"rides": [...]}`` with 1..limit rides."""

    class RideBatch(TypedDict):
        __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
        rides: Annotated[list[Ride], Field(min_length=1, max_length=limit)]

    return TypeAdapter(RideBatch)


def column_batch(limit: int) -> TypeAdapter:
    """``{"columns": {...}}``: a batch as one list per input, of equal lengths (1..limit). Validated by
    ``tripcast.serving.columnar`` with numpy; this adapter documents it (OpenAPI)."""
    def rides(of: object) -> object:
        return Annotated[list[of], Field(min_length=1, max_length=limit)]  # type: ignore[valid-type]

    class RideColumnsBody(TypedDict):
        __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
        PULocationID: rides(ZoneID)  # type: ignore[valid-type]
        DOLocationID: rides(ZoneID)  # type: ignore[valid-type]
        trip_distance: rides(Distance)  # type: ignore[valid-type]
        ride_id: NotRequired[rides(RideId | None)]  # type: ignore[valid-type]
        pickup_datetime: NotRequired[rides(Pickup)]  # type: ignore[valid-type]

    class ColumnBatch(TypedDict):
        __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
        columns: RideColumnsBody

    return TypeAdapter(ColumnBatch)


class Label(BaseModel):
    """Ground truth for a ride: its actual duration in minutes, or its drop-off time."""

    # The one-of rule (``one_of`` below) in the schema too, so that clients and the fuzz see it.
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"ride_id": "green-2021-02-17", "duration": 12.5}],
        "oneOf": [{"required": [given], "properties": {given: {"not": {"type": "null"}}, other: {"type": "null"}}}
                  for given, other in (("duration", "dropoff_datetime"), ("dropoff_datetime", "duration"))]})

    ride_id: RideId
    duration: float | None = Field(None, strict=True, gt=0, le=MAX_LABEL_MINUTES, allow_inf_nan=False,
                                   description="minutes")
    dropoff_datetime: PlausibleTime = Field(None, description="ISO 8601; naive means New York time")

    @model_validator(mode="after")
    def one_of(self) -> "Label":
        if (self.duration is None) == (self.dropoff_datetime is None):
            raise ValueError("give exactly one of duration or dropoff_datetime")
        return self

    def row(self) -> dict:
        dropoff = local_naive(self.dropoff_datetime) if self.dropoff_datetime is not None else None
        return {"ride_id": self.ride_id, "actual_duration": self.duration, "dropoff_datetime": dropoff}


def label_batch(limit: int) -> TypeAdapter:
    """``{"labels": [...]}`` with 1..limit labels."""

    class LabelBatch(BaseModel):
        model_config = ConfigDict(extra="forbid")
        labels: list[Label] = Field(min_length=1, max_length=limit)

    return TypeAdapter(LabelBatch)


def random_ids(n: int) -> list[str]:
    """n random 128-bit ids in 32 hex digits (as ``uuid4().hex``), from one read of the OS's randomness."""
    text = os.urandom(16 * n).hex()
    return [text[i:i + 32] for i in range(0, 32 * n, 32)]


class RideColumns:
    """Validated rides as columns: what ``Preprocessor.features`` takes, plus ids and pickup times. Made from
    row-oriented rides (``from_rides``) or from validated columns (``tripcast.serving.columnar``)."""

    def __init__(self, ride_ids: list[str | None], pickups: list[datetime | None] | np.ndarray, pu: np.ndarray,
                 do: np.ndarray, distance: np.ndarray) -> None:
        """A ride without an id gets a random one; one without a pickup time (None) is picked up now (New
        York). ``pickups`` may already be naive New York datetime64."""
        missing = [i for i, ride_id in enumerate(ride_ids) if ride_id is None]
        for i, ride_id in zip(missing, random_ids(len(missing)), strict=True):
            ride_ids[i] = ride_id
        self.ride_ids: list[str] = ride_ids  # type: ignore[assignment]
        if isinstance(pickups, np.ndarray):
            self.pickup = pickups.astype("datetime64[us]", copy=False)
        else:
            self.pickup = pickup_column(pickups)
        self.pu = pu.astype(np.int32, copy=False)
        self.do = do.astype(np.int32, copy=False)
        self.distance = distance.astype(np.float64, copy=False)

    @classmethod
    def from_rides(cls, rides: list[Ride]) -> "RideColumns":
        n = len(rides)
        return cls([r.get("ride_id") for r in rides], [r.get("pickup_datetime") for r in rides],
                   np.fromiter((r["PULocationID"] for r in rides), np.int32, n),
                   np.fromiter((r["DOLocationID"] for r in rides), np.int32, n),
                   np.fromiter((r["trip_distance"] for r in rides), np.float64, n))

    def __len__(self) -> int:
        return len(self.ride_ids)

    def features(self, preprocessor: Preprocessor, chosen: np.ndarray | None = None) -> dict[str, np.ndarray]:
        columns = (self.pu, self.do, self.distance, self.pickup)
        return preprocessor.features(*(columns if chosen is None else (c[chosen] for c in columns)))

    def log_rows(self, predictions: np.ndarray, versions: list[str], arms: list[str], source: str) -> list[tuple]:
        """Prediction-log rows (``store.PREDICTION_COLUMNS``), built column-wise in C, not ride by ride."""
        n = len(self.ride_ids)
        return list(zip(self.ride_ids, repeat(log_time(), n), log_times(self.pickup), self.pu.tolist(),
                        self.do.tolist(), self.distance.tolist(), predictions.tolist(), versions, arms,
                        repeat(source, n), repeat(None, n), repeat(None, n), strict=True))


def pickup_column(pickups: list[datetime | None]) -> np.ndarray:
    """Validated pickup times (None: now, one "now" per request) as naive New York datetime64[us]."""
    now = local_naive(None)
    if all(p is None for p in pickups):
        return np.full(len(pickups), np.datetime64(now, "us"))
    # pandas converts a list of datetimes in C; numpy would take 20x longer
    return pd.DatetimeIndex([now if p is None else local_naive(p) for p in pickups]).to_numpy().astype(
        "datetime64[us]")


def log_features(rows: list[tuple], preprocessor: Preprocessor) -> dict[str, np.ndarray]:
    """Model input from prediction-log rows (to score them with another model: shadow traffic)."""
    pickup, pu, do, distance = zip(*(row[2:6] for row in rows), strict=True)
    return preprocessor.features(np.array(pu, dtype=np.int32), np.array(do, dtype=np.int32),
                                 np.array(distance, dtype=np.float64), np.array(pickup, dtype="datetime64[us]"))
