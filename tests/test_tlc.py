"""The TLC data layer on the real files: schemas of every year, mirrors, caching, and bad input."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import CorruptFileError, DataError, MissingMonthError, SourceUnavailableError
from tripcast.rehearsal import free_port

MONTHS_BY_YEAR = ["2021-01", "2022-01", "2023-01", "2023-02", "2023-03", "2024-01"]


def _leftovers(settings: Settings) -> list[Path]:
    folder = settings.data_dir
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("month", MONTHS_BY_YEAR)
def test_every_year_normalises_to_one_schema(settings: Settings, tlc_mirror: Path, month: str) -> None:
    frame = tlc.read_month("green", month, settings)
    assert list(frame.columns) == tlc.CANONICAL_COLUMNS
    assert {str(t) for t in frame.dtypes} <= {"datetime64[us]", "int32", "float64"}
    assert str(frame["PULocationID"].dtype) == "int32" and str(frame["pickup_datetime"].dtype) == "datetime64[us]"
    assert len(frame) == pq.ParquetFile(tlc_mirror / f"green_tripdata_{month}.parquet").metadata.num_rows
    raw = pd.read_parquet(tlc_mirror / f"green_tripdata_{month}.parquet", columns=["lpep_pickup_datetime",
                                                                                    "PULocationID"])
    assert (frame["pickup_datetime"].to_numpy() == raw["lpep_pickup_datetime"].to_numpy()).all()
    assert (frame["PULocationID"].to_numpy() == raw["PULocationID"].to_numpy()).all()


def test_months_with_different_published_dtypes_concatenate(settings: Settings) -> None:
    # 2023-01 has int64 IDs and double passenger counts; 2023-02 int32 and int64: one schema after reading.
    both = tlc.read_months("green", tlc.month_range("2023-01", "2023-02"), settings)
    assert len(both) == 68_211 + 64_809
    assert str(both["DOLocationID"].dtype) == "int32"


def test_fhv_and_yellow_column_spellings_are_mapped(settings: Settings, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    stamps = pa.array([pd.Timestamp("2021-01-01 10:00"), pd.Timestamp("2021-01-01 11:00")], pa.timestamp("ns"))
    pq.write_table(pa.table({"dispatching_base_num": ["B1", "B2"], "pickup_datetime": stamps,
                             "dropOff_datetime": stamps, "PUlocationID": pa.array([1.0, None]),
                             "DOlocationID": pa.array([2.0, 3.0]), "SR_Flag": [None, None]}),
                   mirror / "fhv_tripdata_2021-01.parquet")
    pq.write_table(pa.table({"tpep_pickup_datetime": stamps, "tpep_dropoff_datetime": stamps,
                             "PULocationID": pa.array([4, 5], pa.int64()), "DOLocationID": [6, 7],
                             "trip_distance": [1.5, 2.5]}), mirror / "yellow_tripdata_2021-01.parquet")
    local = settings.with_overrides(tlc_mirror=str(mirror))
    fhv = tlc.read_month("fhv", "2021-01", local)
    yellow = tlc.read_month("yellow", "2021-01", local)
    assert list(fhv.columns) == list(yellow.columns) == tlc.CANONICAL_COLUMNS
    assert fhv["PULocationID"].tolist() == [1, 0]  # a missing zone becomes 0, which validation drops and counts
    assert fhv["trip_distance"].isna().all() and yellow["trip_distance"].tolist() == [1.5, 2.5]


def test_file_url_mirror_and_cache(settings: Settings, tlc_mirror: Path) -> None:
    local = settings.with_overrides(tlc_mirror=tlc_mirror.as_uri())
    previous = os.umask(0o022)
    try:
        path = tlc.fetch("green", "2021-02", local)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # as any file the user writes, not mkstemp's 0600
    assert path == tlc.cache_path("green", "2021-02", local) and path.read_bytes() == (
        tlc_mirror / "green_tripdata_2021-02.parquet").read_bytes()
    before = path.stat().st_mtime_ns
    assert tlc.fetch("green", "2021-02", local) == path and path.stat().st_mtime_ns == before  # served from cache
    listed = list(tlc.cached_files(local))
    assert [(item["color"], item["month"], item["rows"]) for item in listed] == [("green", "2021-02", 64_572)]


@pytest.mark.parametrize(("color", "month", "message"), [
    ("purple", "2021-01", "unknown colour 'purple'"),
    ("green", "2021-13", "malformed month '2021-13'"),
    ("green", "2021/01", "malformed month '2021/01'"),
    ("green", "21-01", "malformed month '21-01'"),
    ("green", "2008-12", "before the TLC's first published month"),
])
def test_bad_requests_name_the_problem(settings: Settings, color: str, month: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        tlc.fetch(color, month, settings)
    assert _leftovers(settings) == []


def test_missing_month_names_month_and_address(settings: Settings, tlc_mirror: Path) -> None:
    with pytest.raises(MissingMonthError) as info:
        tlc.fetch("green", "2021-05", settings)
    assert "2021-05" in str(info.value) and str(tlc_mirror) in str(info.value)
    assert _leftovers(settings) == []


def test_empty_month_range_is_refused() -> None:
    with pytest.raises(DataError, match="empty month range"):
        tlc.month_range("2021-03", "2021-01")
    assert [str(m) for m in tlc.month_range("2021-11", "2022-02")] == ["2021-11", "2021-12", "2022-01", "2022-02"]


def test_truncated_file_is_rejected_and_not_cached(settings: Settings, tlc_mirror: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "broken"
    mirror.mkdir()
    good = (tlc_mirror / "green_tripdata_2021-01.parquet").read_bytes()
    (mirror / "green_tripdata_2021-01.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match="rejected and not cached"):
        tlc.fetch("green", "2021-01", settings.with_overrides(tlc_mirror=str(mirror)))
    assert _leftovers(settings) == []


def test_parquet_without_trip_columns_is_rejected(settings: Settings, tmp_path: Path) -> None:
    mirror = tmp_path / "wrong"
    mirror.mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), mirror / "green_tripdata_2021-01.parquet")
    with pytest.raises(CorruptFileError, match="lacks the green columns"):
        tlc.fetch("green", "2021-01", settings.with_overrides(tlc_mirror=str(mirror)))
    assert _leftovers(settings) == []


def test_damaged_cache_entry_is_fetched_again(settings: Settings) -> None:
    path = tlc.fetch("green", "2021-01", settings)
    path.write_bytes(b"not parquet")
    assert tlc.validate_file(tlc.fetch("green", "2021-01", settings), "green") == 76_518



class _FlakyMirror(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first request for each file fails with 503 (a transient error)."""

    failed: set[str] = set()
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        type(self).requests.append(self.path)
        if self.path not in self.failed:
            self.failed.add(self.path)
            self.send_error(503)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_mirror(tlc_mirror: Path):
    _FlakyMirror.failed, _FlakyMirror.requests = set(), []
    handler = lambda *a, **k: _FlakyMirror(*a, directory=str(tlc_mirror), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/trip-data"
    server.shutdown()


def test_http_mirror_retries_transient_errors(settings: Settings, http_mirror: str, tlc_mirror: Path) -> None:
    remote = settings.with_overrides(tlc_mirror=http_mirror.removesuffix("/trip-data"), download_backoff_seconds=0.01)
    path = tlc.fetch("green", "2021-03", remote)
    assert path.read_bytes() == (tlc_mirror / "green_tripdata_2021-03.parquet").read_bytes()
    assert _FlakyMirror.requests == ["/green_tripdata_2021-03.parquet"] * 2  # a 503, then the file


def test_http_missing_month_names_address(settings: Settings, http_mirror: str) -> None:
    base = http_mirror.removesuffix("/trip-data")
    remote = settings.with_overrides(tlc_mirror=base, download_backoff_seconds=0.01)
    with pytest.raises(MissingMonthError) as info:
        # first request is the flaky 503 (retried), the second a real 404
        tlc.fetch("green", "2020-07", remote)
    assert f"{base}/green_tripdata_2020-07.parquet" in str(info.value) and "2020-07" in str(info.value)
    assert _leftovers(settings) == []


def test_offline_without_mirror_names_the_setting(settings: Settings) -> None:
    closed = f"http://127.0.0.1:{free_port()}/trip-data"  # nothing listens there: connection refused
    offline = settings.with_overrides(tlc_mirror=None, tlc_base_url=closed, download_retries=2,
                                      download_backoff_seconds=0.01)
    with pytest.raises(SourceUnavailableError, match="TRIPCAST_TLC_MIRROR"):
        tlc.fetch("green", "2021-01", offline)
    assert _leftovers(settings) == []


def test_latest_months_walks_back_to_what_the_source_has(settings: Settings) -> None:
    train, val = tlc.latest_months("green", settings, today=pd.Timestamp("2024-06-15"))
    assert (str(train), str(val)) == ("2024-02", "2024-03")  # the mirror's newest file is 2024-03


def test_month_helpers() -> None:
    month = tlc.Month.parse("2021-12")
    assert str(month.shift(1)) == "2022-01" and str(month.shift(-12)) == "2020-12"
    assert month.start == pd.Timestamp("2021-12-01") and month.end == pd.Timestamp("2022-01-01")


def test_mirror_copy_is_atomic_on_failure(settings: Settings, tlc_mirror: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_copy(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        tlc.fetch("green", "2021-01", settings)
    assert _leftovers(settings) == []


@pytest.mark.parametrize("kind", ["slower-traffic", "longer-distances", "zone-shift"])
def test_injected_drift_keeps_the_tlc_schema_and_changes_what_it_says(settings: Settings, tmp_path: Path,
                                                                      kind: str) -> None:
    import pyarrow.parquet as pq

    from tripcast.data.drift import inject

    path = inject("green", "2021-02", kind, settings, tmp_path / "mirror")
    original = tlc.fetch("green", "2021-02", settings)
    assert pq.read_schema(path) == pq.read_schema(original) and path.name == original.name
    drifted = tlc.read_month("green", "2021-02", settings.with_overrides(tlc_mirror=str(path.parent),
                                                                         home=tmp_path / "other"))
    before = tlc.read_month("green", "2021-02", settings)
    duration = (drifted["dropoff_datetime"] - drifted["pickup_datetime"]) / (
        before["dropoff_datetime"] - before["pickup_datetime"])
    moved = (drifted["PULocationID"] != before["PULocationID"]).mean()
    if kind == "slower-traffic":
        assert duration.median() == pytest.approx(1.5) and moved == 0
        assert drifted["trip_distance"].equals(before["trip_distance"])
    elif kind == "longer-distances":
        assert duration.median() == pytest.approx(1.6) and moved == 0
        assert (drifted["trip_distance"] / before["trip_distance"]).median() == pytest.approx(1.6)
    else:  # the 20 busiest pickup zones swapped with quiet ones: most rides move, durations do not
        assert moved > 0.4 and duration.median() == 1.0
        assert drifted["pickup_datetime"].equals(before["pickup_datetime"])
