"""Target, validation filters (with a count per rule) and the one preprocessor.

The preprocessor is the only place that turns rides into model input. Training, batch scoring, streaming
and the API all call ``Preprocessor.transform``; it is saved (as JSON) inside every registered model.
Only features known when a ride is requested are used: zones, their pair, distance, pickup hour and weekday.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from tripcast.errors import DataError

ZONE_MIN, ZONE_MAX = 1, 265  # TLC taxi zones 1..265 (264/265 are "Unknown")
TARGET = "duration"
REQUEST_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance"]


NEW_YORK = "America/New_York"


def local_naive(value: datetime | None, timezone: str = NEW_YORK) -> datetime:
    """A pickup time as the TLC records it: naive New York time. None means now; aware times are converted."""
    if value is None or value is pd.NaT:
        return datetime.now(ZoneInfo(timezone)).replace(tzinfo=None)
    return value.astimezone(ZoneInfo(timezone)).replace(tzinfo=None) if value.tzinfo else value


def zone_pair(pu: int | np.ndarray, do: int | np.ndarray) -> int | np.ndarray:
    """One key per (pickup, drop-off) zone pair; works on ints and on int arrays alike."""
    return pu * 1000 + do


def duration_minutes(rides: pd.DataFrame) -> np.ndarray:
    """Duration in minutes from the canonical pickup and drop-off times."""
    delta = rides["dropoff_datetime"].to_numpy() - rides["pickup_datetime"].to_numpy()
    return delta / np.timedelta64(1, "s") / 60.0


@dataclass
class DropReport:
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def __add__(self, other: DropReport) -> DropReport:
        """Counts of two sets of rides filtered apart (months, partitions on a cluster)."""
        rules = list(dict.fromkeys([*self.dropped, *other.dropped]))
        return DropReport(self.rows_in + other.rows_in,
                          {rule: self.dropped.get(rule, 0) + other.dropped.get(rule, 0) for rule in rules})

    def as_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}_rows_in": self.rows_in, f"{prefix}_rows_out": self.rows_out}
        metrics.update({f"{prefix}_dropped_{rule}": count for rule, count in self.dropped.items()})
        return metrics


def clean(
    rides: pd.DataFrame,
    min_duration: float = 1.0,
    max_duration: float = 60.0,
    month_start: pd.Timestamp | None = None,
    month_end: pd.Timestamp | None = None,
    max_distance: float | None = None,
) -> tuple[pd.DataFrame, DropReport]:
    """Apply the rules in order; each row is counted against the first rule it breaks.

    ``max_distance`` (miles) is off by default so that validation sets, and so RMSEs, stay comparable with
    the course's published figures (which only filter on duration); a cap of ~100 miles removes meter errors.
    """
    duration = rides[TARGET].to_numpy() if TARGET in rides else duration_minutes(rides)
    distance = rides["trip_distance"].to_numpy()
    pickup = rides["pickup_datetime"]
    zones_ok = rides["PULocationID"].between(ZONE_MIN, ZONE_MAX) & rides["DOLocationID"].between(ZONE_MIN, ZONE_MAX)
    rules: list[tuple[str, np.ndarray]] = [
        ("missing_values", pickup.isna().to_numpy() | np.isnan(duration) | np.isnan(distance)),
        ("zone_out_of_range", ~zones_ok.to_numpy()),
        ("distance_out_of_range", (distance < 0) | (distance > (max_distance or np.inf))),
        ("duration_below_min", duration < min_duration),
        ("duration_above_max", duration > max_duration),
    ]
    if month_start is not None and month_end is not None:
        outside = ((pickup < month_start) | (pickup >= month_end)).to_numpy()
        rules.insert(1, ("pickup_outside_month", outside))
    report = DropReport(rows_in=len(rides))
    keep = np.ones(len(rides), dtype=bool)
    for rule, broken in rules:
        hit = keep & broken
        report.dropped[rule] = int(hit.sum())
        keep &= ~broken
    kept = rides.loc[keep].reset_index(drop=True)
    kept[TARGET] = duration[keep]
    return kept, report


@dataclass(frozen=True)
class Preprocessor:
    """Rides (PULocationID, DOLocationID, trip_distance, optional pickup_datetime) -> model features.

    A missing pickup time means "now" in New York, where the TLC's naive timestamps live.
    """

    timezone: str = NEW_YORK
    version: int = 1

    FEATURES = ("PULocationID", "DOLocationID", "zone_pair", "trip_distance", "pickup_hour", "pickup_dow")

    def transform(self, rides: pd.DataFrame) -> pd.DataFrame:
        """A frame of rides -> a frame of features (training, batch, the pyfunc model)."""
        missing = [c for c in REQUEST_COLUMNS if c not in rides]
        if missing:
            raise DataError(f"rides lack the columns {missing}")
        return pd.DataFrame(self.features(rides["PULocationID"].to_numpy(), rides["DOLocationID"].to_numpy(),
                                          rides["trip_distance"].to_numpy(), self._pickup_times(rides).to_numpy()))

    def features(self, pu: np.ndarray, do: np.ndarray, distance: np.ndarray,
                 pickup: np.ndarray) -> dict[str, np.ndarray]:
        """The features as numpy columns; ``pickup`` holds naive New York times (datetime64). The online API
        calls this directly: a frame costs more than the model for a single ride."""
        # Hour and weekday by integer arithmetic on datetime64 (pandas' .dt is slower).
        minutes = pickup.astype("datetime64[m]")
        days = minutes.astype("datetime64[D]")
        pu = pu.astype(np.int32, copy=False)
        do = do.astype(np.int32, copy=False)
        return {
            "PULocationID": pu,
            "DOLocationID": do,
            "zone_pair": zone_pair(pu, do),
            "trip_distance": distance.astype(np.float64, copy=False),
            "pickup_hour": ((minutes - days).astype(np.int64) // 60).astype(np.int32),
            "pickup_dow": ((days.astype(np.int64) + 3) % 7).astype(np.int32),  # 1970-01-01 was a Thursday
        }

    def one(self, pu: int, do: int, distance: float, pickup: datetime) -> dict[str, float]:
        """``features`` for a single ride, as Python numbers: numpy's per-call cost would exceed the
        arithmetic many times over (the online API's path). Tested to equal ``features`` exactly."""
        return {"PULocationID": pu, "DOLocationID": do, "zone_pair": zone_pair(pu, do), "trip_distance": distance,
                "pickup_hour": pickup.hour, "pickup_dow": pickup.weekday()}

    def rows(self, rides: pd.DataFrame) -> list[tuple[int, int, float, datetime]] | None:
        """A few rides as ``one``'s arguments, read value by value (a frame's vectorised path costs ~50x more
        for one ride); None when a value needs that path to be read the same way (not a plain number, a pickup
        time that is neither a datetime, text Python reads as ISO 8601, nor missing)."""
        if any(c not in rides for c in REQUEST_COLUMNS):
            return None
        now = None
        pickups = rides["pickup_datetime"].tolist() if "pickup_datetime" in rides else [None] * len(rides)
        found = []
        for pu, do, distance, pickup in zip(rides["PULocationID"].tolist(), rides["DOLocationID"].tolist(),
                                            rides["trip_distance"].tolist(), pickups, strict=True):
            if not all(type(v) in (int, float) and v == v for v in (pu, do, distance)) or pu % 1 or do % 1:
                return None
            if pickup is None or pickup is pd.NaT or (type(pickup) is float and pickup != pickup):
                now = now or local_naive(None, self.timezone)
                pickup = now
            elif isinstance(pickup, str):
                try:
                    pickup = local_naive(datetime.fromisoformat(pickup), self.timezone)
                except ValueError:
                    return None
            elif isinstance(pickup, datetime):
                pickup = local_naive(pickup.to_pydatetime() if isinstance(pickup, pd.Timestamp) else pickup,
                                     self.timezone)
            else:
                return None
            found.append((int(pu), int(do), float(distance), pickup))
        return found

    def _pickup_times(self, rides: pd.DataFrame) -> pd.Series:
        now = pd.Timestamp(local_naive(None, self.timezone))
        if "pickup_datetime" not in rides:
            return pd.Series(np.full(len(rides), now, dtype="datetime64[us]"))
        column = rides["pickup_datetime"]
        if not pd.api.types.is_datetime64_any_dtype(column):
            try:
                parsed = pd.to_datetime(column, format="ISO8601")
            except (ValueError, TypeError):
                parsed = None
            if parsed is None or not pd.api.types.is_datetime64_any_dtype(parsed):
                # Mixed offsets (some with a zone, some without): parse one by one.
                parsed = pd.Series([self._parse_one(v) for v in column], index=rides.index, dtype="datetime64[us]")
            column = parsed
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            column = column.dt.tz_convert(self.timezone).dt.tz_localize(None)
        return column.fillna(now).reset_index(drop=True)

    def _parse_one(self, value: object) -> pd.Timestamp:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return pd.NaT
        try:
            return pd.Timestamp(local_naive(pd.Timestamp(value), self.timezone))
        except (ValueError, TypeError):
            raise DataError(f"pickup_datetime {value!r} is not an ISO 8601 time") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessor:
        return cls(**data)


def targets(rides: pd.DataFrame) -> np.ndarray:
    return rides[TARGET].to_numpy(dtype=np.float64)
