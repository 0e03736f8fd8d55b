"""Validation filters and their drop counts on real data; the one preprocessor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import DataError


def test_drop_counts_on_green_2021_01(settings: Settings, tlc_mirror: Path) -> None:
    month = tlc.Month.parse("2021-01")
    kept, report = feats.clean(tlc.read_month("green", month, settings), 1, 60, month.start, month.end)

    # The same rules written independently with plain pandas on the published file.
    raw = pd.read_parquet(tlc_mirror / "green_tripdata_2021-01.parquet")
    minutes = (raw.lpep_dropoff_datetime - raw.lpep_pickup_datetime).dt.total_seconds() / 60
    in_month = (raw.lpep_pickup_datetime >= "2021-01-01") & (raw.lpep_pickup_datetime < "2021-02-01")
    assert report.rows_in == len(raw) == 76_518
    assert report.dropped["pickup_outside_month"] == (~in_month).sum() == 3
    assert report.dropped["duration_below_min"] == (in_month & (minutes < 1)).sum()
    assert report.dropped["duration_above_max"] == (in_month & (minutes > 60)).sum()
    assert report.dropped["missing_values"] == report.dropped["zone_out_of_range"] == 0
    assert report.dropped["distance_out_of_range"] == 0  # no cap by default: the course's filters
    assert report.rows_out == len(kept) == (in_month & minutes.between(1, 60)).sum() == 73_906
    assert kept[feats.TARGET].between(1, 60).all()
    metrics = report.as_metrics("train")
    assert metrics["train_rows_in"] - metrics["train_rows_out"] == sum(report.dropped.values())


def test_each_row_counts_against_its_first_broken_rule() -> None:
    t0 = pd.Timestamp("2021-01-10 08:00")
    rides = pd.DataFrame({
        "pickup_datetime": [t0, t0, t0, t0, t0, pd.Timestamp("2020-12-31 23:00")],
        "dropoff_datetime": [t0 + pd.Timedelta(minutes=m) for m in (10, 0.5, 90, 10, 10, 10)],
        "PULocationID": np.array([1, 2, 3, 300, 5, 6], dtype=np.int32),
        "DOLocationID": np.array([1, 2, 3, 4, 5, 6], dtype=np.int32),
        "trip_distance": [1.0, 1.0, 1.0, 1.0, 500.0, np.nan],
    })
    month = tlc.Month.parse("2021-01")
    kept, report = feats.clean(rides, 1, 60, month.start, month.end, max_distance=100)
    assert report.dropped == {"missing_values": 1, "pickup_outside_month": 0, "zone_out_of_range": 1,
                              "distance_out_of_range": 1, "duration_below_min": 1, "duration_above_max": 1}
    assert kept["PULocationID"].tolist() == [1]


def test_preprocessor_features_and_timezones() -> None:
    rides = pd.DataFrame({
        "PULocationID": [130, 43], "DOLocationID": [205, 151], "trip_distance": [3.66, 1.1],
        "pickup_datetime": ["2021-02-01T08:30:00", "2021-02-06T13:15:00Z"],  # naive = New York; Z = UTC
    })
    out = feats.Preprocessor().transform(rides)
    assert list(out.columns) == list(feats.Preprocessor.FEATURES)
    assert out["zone_pair"].tolist() == [130205, 43151]
    assert out["pickup_hour"].tolist() == [8, 8]  # 13:15 UTC is 08:15 in New York in February
    assert out["pickup_dow"].tolist() == [0, 5]  # Monday, Saturday
    assert out.dtypes["PULocationID"] == np.int32 and out.dtypes["trip_distance"] == np.float64


def test_missing_pickup_time_means_now_in_new_york() -> None:
    out = feats.Preprocessor().transform(pd.DataFrame({"PULocationID": [1], "DOLocationID": [2],
                                                       "trip_distance": [1.0]}))
    now = pd.Timestamp.now(tz="America/New_York")
    assert out["pickup_hour"].iloc[0] in (now.hour, (now.hour - 1) % 24)
    assert out["pickup_dow"].iloc[0] in (now.dayofweek, (now.dayofweek - 1) % 7)


def test_preprocessor_names_missing_columns() -> None:
    with pytest.raises(DataError, match="trip_distance"):
        feats.Preprocessor().transform(pd.DataFrame({"PULocationID": [1], "DOLocationID": [2]}))


def test_preprocessor_round_trips_through_json() -> None:
    pre = feats.Preprocessor(timezone="UTC")
    assert feats.Preprocessor.from_dict(pre.to_dict()) == pre


def test_unparseable_pickup_time_is_named() -> None:
    rides = pd.DataFrame({"PULocationID": [1, 2], "DOLocationID": [2, 3], "trip_distance": [1.0, 2.0],
                          "pickup_datetime": ["2021-02-01T08:30:00", "yesterday-ish"]})
    with pytest.raises(DataError, match="yesterday-ish"):
        feats.Preprocessor().transform(rides)


def test_one_ride_gets_the_features_a_batch_gets() -> None:
    """``Preprocessor.one`` (the online API's path, plain Python) agrees with the vectorised ``features``."""
    pre = feats.Preprocessor()
    times = pd.date_range("2021-03-13 22:00", "2021-03-15 02:00", freq="37min")  # across a DST change and days
    n = len(times)
    pu, do, distance = np.arange(n) % 265 + 1, (np.arange(n) * 7) % 265 + 1, np.linspace(0, 30, n)
    batch = pre.features(pu, do, distance, times.to_numpy())
    for i, when in enumerate(times):
        one = pre.one(int(pu[i]), int(do[i]), float(distance[i]), when.to_pydatetime())
        assert one == {name: column[i].item() for name, column in batch.items()}, when
