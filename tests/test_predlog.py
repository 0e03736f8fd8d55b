"""The prediction log's rows, their insert into a real store, the writer's bound, and the traffic policy's
vectorised arm (the API's batch path must send a ride where its single path sends it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from tripcast.serving import predlog
from tripcast.serving.predlog import PredictionLog
from tripcast.serving.schemas import RIDE, RideColumns
from tripcast.serving.traffic import CHALLENGER_ARM, TrafficPolicy, bucket, buckets
from tripcast.store import (
    OBSOLETE_INDEXES,
    PREDICTION_COLUMNS,
    connect,
    insert_predictions,
    log_time,
    log_times,
    predictions,
    shared,
)

PICKUPS = [datetime(2021, 3, 1), datetime(2021, 3, 14, 2, 30, 0, 1), datetime(2100, 12, 31, 23, 59, 59, 999999)]


def _rows(prefix: str, n: int) -> list[tuple]:
    return [(f"{prefix}-{i}", log_time(), log_time(PICKUPS[i % 3]), 1 + i % 265, 265 - i % 265, 0.5 * i, 10.0 + i,
             "3", "champion", "api", None, None) for i in range(n)]


def test_log_times_are_the_text_sqlalchemy_stores() -> None:
    array = np.array(PICKUPS, dtype="datetime64[us]")
    assert log_times(array) == [log_time(p) for p in PICKUPS] == [
        "2021-03-01 00:00:00.000000", "2021-03-14 02:30:00.000001", "2100-12-31 23:59:59.999999"]


def _round_trip(url: str) -> None:
    engine = connect(url)
    rows = _rows("trip", 1234)  # more than one statement's worth
    odd_ids = ["back\\slash\\N", "quote\"'", "tab\tand\nnewline", "ünïcødé 🚕", "NULL", ""]
    rows[:len(odd_ids)] = [(ride_id, *row[1:]) for ride_id, row in zip(odd_ids, rows, strict=False)]
    with engine.begin() as conn:
        insert_predictions(conn, rows)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(*[predictions.c[c] for c in PREDICTION_COLUMNS])
                              .order_by(predictions.c.id)).all()
        # Window queries compare times in SQL: the stored text must order and match like SQLAlchemy's own.
        in_march = conn.execute(sa.select(sa.func.count()).where(
            predictions.c.pickup_datetime >= datetime(2021, 3, 1),
            predictions.c.pickup_datetime < datetime(2021, 3, 14, 2, 30, 0, 1))).scalar_one()
    engine.dispose()
    assert len(stored) == len(rows) and in_march == 412
    # One transaction's rows are stored in ride_id order (stable: a ride's own rows keep theirs).
    for row, back in zip(sorted(rows, key=lambda r: r[0]), stored, strict=True):
        assert back.pickup_datetime == datetime.fromisoformat(row[2])
        assert back.logged_at == datetime.fromisoformat(row[1])
        assert back.ride_id == row[0] and tuple(back)[3:] == row[3:]


def _drops_obsolete_indexes(url: str) -> None:
    """A store made by tripcast 0.1 loses the two indexes nothing reads, and keeps the two that are read."""
    engine = connect(url)
    with engine.begin() as conn:
        for name in OBSOLETE_INDEXES:
            conn.exec_driver_sql(f"CREATE INDEX {name} ON predictions ({name.removeprefix('ix_predictions_')})")
    assert {i["name"] for i in sa.inspect(engine).get_indexes("predictions")} >= set(OBSOLETE_INDEXES)
    engine.dispose()
    engine = connect(url)
    assert {i["name"] for i in sa.inspect(engine).get_indexes("predictions")} == {
        "ix_predictions_ride_id", "ix_predictions_pickup_datetime"}
    engine.dispose()


def test_rows_round_trip_through_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'store.db'}")
    _drops_obsolete_indexes(f"sqlite:///{tmp_path / 'store.db'}")


@pytest.mark.postgres
def test_rows_round_trip_through_postgres(postgres_database) -> None:
    url = postgres_database()
    _round_trip(url)
    _drops_obsolete_indexes(url)


# A process that opens the store once its siblings are all ready to (a "go" file): a new store opened at once
# by API workers, the stream consumer and a flow.
OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from tripcast.store import connect
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
connect(sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_processes_opening_a_new_store_at_once_all_succeed(backend: str, tmp_path: Path, postgres_database) -> None:
    for trial in range(3):  # each used to lose the race to create the tables ~3 times in 4
        folder = tmp_path / str(trial)
        folder.mkdir()
        url = f"sqlite:///{folder / 'store.db'}" if backend == "sqlite" else postgres_database()
        openers = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, url, str(folder), str(n)],
                                    stderr=subprocess.PIPE, text=True) for n in range(4)]
        deadline = time.monotonic() + 60
        while len(list(folder.glob("ready-*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        (folder / "go").touch()
        errors = [opener.communicate(timeout=60)[1] for opener in openers]
        assert [opener.returncode for opener in openers] == [0] * 4, errors
        engine = connect(url, create=False)
        assert set(sa.inspect(engine).get_table_names()) >= {"predictions", "labels"}
        engine.dispose()


def test_threads_of_one_process_share_one_engine_per_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with ThreadPoolExecutor(8) as pool:  # the API's first requests arrive together
        engines = list(pool.map(lambda _: shared(url), range(8)))
    assert all(engine is engines[0] for engine in engines)


@pytest.mark.postgres
def test_a_role_that_cannot_drop_the_old_indexes_still_opens_the_store(postgres_database, caplog) -> None:
    url = postgres_database()
    owner = connect(url)
    role = f"writer_{uuid.uuid4().hex[:8]}"
    with owner.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_predictions_logged_at ON predictions (logged_at)")
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    try:
        limited = connect(url.replace("postgres@", f"{role}@"))
        with limited.begin() as conn:
            insert_predictions(conn, _rows("limited", 3))
        limited.dispose()
        assert "could not drop the unused index ix_predictions_logged_at" in caplog.text
        assert "ix_predictions_logged_at" in {i["name"] for i in sa.inspect(owner).get_indexes("predictions")}
        with owner.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one() == 3
    finally:
        with owner.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        owner.dispose()


def test_the_writer_flushes_in_the_background_and_counts_what_the_bounds_refuse(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger=predlog.__name__)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", queue_size=1000, batch_size=300, flush_seconds=0.05,
                        shadow=lambda rows: ([1.5] * len(rows), "4"))
    log.put(_rows("first", 900))
    log.put(_rows("over", 200))  # 900 + 200 > 1000: past the queue, on its way to the spool instead
    log.put(_rows("refused", 900))  # 200 + 900 > 1000: past that bound too, refused whole, and counted
    assert log.dropped == 900 and log.depth == 1100
    log.start()
    deadline = time.monotonic() + 10
    while log.written < 1100 and time.monotonic() < deadline:
        time.sleep(0.02)
    log.put(_rows("second", 100))
    log.stop()  # flushes what is queued
    with connect(url).connect() as conn:
        logged = pd.read_sql(sa.select(predictions), conn)
    assert log.written == 1200 and log.depth == 0 and log.store_up and log.dropped == 900
    assert log.spooled == 200 and log.replayed == 200 and not log.spool.exists() and not log.behind
    ids = logged["ride_id"]
    assert ids.str.startswith("first").sum() == 900 and ids.str.startswith("second").sum() == 100
    assert ids.str.startswith("over").sum() == 200 and not ids.str.startswith("refused").any()
    assert (logged["shadow_prediction"] == 1.5).all() and (logged["shadow_version"] == "4").all()  # spooled too
    # Each spell is said once when it starts and once when it ends: rows refused, rows going to the spool.
    assert [r.getMessage()[:50] for r in caplog.records if r.name == predlog.__name__] == [
        "prediction log: predictions come faster than the s",  # ... store and the spool together take them
        "prediction log: predictions come faster than the s",  # ... store takes them; rows past the queue ...
        "prediction log: the store has caught up (the spool",
        "prediction log: no longer dropping rows (900 dropp"]
    assert "spool together" in caplog.records[0].getMessage() and caplog.records[0].levelname == "ERROR"


def test_while_the_store_is_down_a_backlog_is_spooled_at_once_and_replayed_later(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger=predlog.__name__)
    folder = tmp_path / "not-yet"  # SQLite cannot open a file in a folder that does not exist: the store is down
    url = f"sqlite:///{folder / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", batch_size=100, flush_seconds=0.05)
    log.put(_rows("backlog", 1000))
    log.start()
    deadline = time.monotonic() + 5
    while log.spooled < 1000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.spooled == 1000 and log.written == 0 and not log.store_up and log.depth == 0  # ten batches, one try
    folder.mkdir()  # the store comes back
    deadline = time.monotonic() + 10
    while log.written < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.stop()
    with connect(url).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one() == 1000
    assert log.store_up and not log.spool.exists() and log.dropped == 0
    # An outage is said once when it starts and once when it ends, however many flushes it lasted.
    assert [r.getMessage()[:40] for r in caplog.records if r.name == predlog.__name__] == [
        "prediction log: store unavailable, rows ", "prediction log: the store answers again "]


def test_with_the_store_down_and_the_spool_unwritable_rows_are_counted_and_the_writer_carries_on(
        tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"
    url = f"sqlite:///{folder / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", batch_size=100, flush_seconds=0.05)
    log.spool.mkdir()  # stands in for a full or read-only disk: neither appending nor reading the spool works
    log.put(_rows("lost", 250))
    log.start()
    deadline = time.monotonic() + 5
    while log.dropped < 250 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.dropped == 250 and log.spooled == 0 and log.depth == 0 and "spool" in log.last_error
    log.spool.rmdir()  # the disk has room again, and the store comes back
    folder.mkdir()
    log.put(_rows("kept", 100))
    deadline = time.monotonic() + 10
    while log.written < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.stop()
    with connect(url).connect() as conn:
        ids = pd.read_sql(sa.select(predictions.c.ride_id), conn)["ride_id"]
    assert log.written == 100 and log.dropped == 250 and log.store_up
    assert sorted(ids) == sorted(row[0] for row in _rows("kept", 100))


def test_spilled_rows_get_their_shadow_predictions_as_they_are_replayed(tmp_path: Path) -> None:
    # Scoring the overflow with the challenger before spooling it cost as much as the rows' own scoring, at
    # the moment the writer was already behind (10-13 % of a batch load dropped in shadow mode).
    folder = tmp_path / "not-yet"  # the store is down at first
    url = f"sqlite:///{folder / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", queue_size=100, flush_seconds=0.05,
                        shadow=lambda rows: ([2.5] * len(rows), "7"))
    log.put(_rows("queued", 100))
    log.put(_rows("spilled", 50))  # past the queue
    log.start()
    deadline = time.monotonic() + 5
    while log.spooled < 150 and time.monotonic() < deadline:
        time.sleep(0.02)
    spooled = {row[0]: row[-2:] for row in log._read_spool(1000)[0]}
    assert {spooled[f"spilled-{i}"] for i in range(50)} == {(None, None)}  # no challenger work yet
    assert {spooled[f"queued-{i}"] for i in range(100)} == {(2.5, "7")}
    folder.mkdir()  # the store comes back: the spool is replayed, the missing shadow predictions added
    deadline = time.monotonic() + 10
    while log.written < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.stop()
    with connect(url).connect() as conn:
        logged = pd.read_sql(sa.select(predictions), conn)
    assert len(logged) == 150 and (logged["shadow_prediction"] == 2.5).all() and (logged["shadow_version"] == "7").all()


def test_the_spool_stops_at_its_size_limit_and_counts_what_it_refuses(tmp_path: Path, caplog) -> None:
    # A long outage (or overload) must not fill the disk the store, MLflow and the service share.
    caplog.set_level("WARNING", logger=predlog.__name__)
    url = f"sqlite:///{tmp_path / 'not-yet' / 'store.db'}"  # the store is down throughout
    log = PredictionLog(url, tmp_path / "spool", batch_size=1000, flush_seconds=0.05, spool_max_mb=0.05)

    def settled(spooled: int, dropped: int) -> None:
        deadline = time.monotonic() + 5
        while (log.spooled, log.dropped) != (spooled, dropped) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (log.spooled, log.dropped, log.depth) == (spooled, dropped, 0)

    log.start()
    log.put(_rows("kept", 100))  # ~13 kB: within the 50 kB
    settled(100, 0)
    log.put(_rows("refused", 900))  # ~120 kB more: refused whole
    settled(100, 900)
    log.put(_rows("refused-too", 900))
    settled(100, 1800)
    log.stop()
    assert log.spool.stat().st_size <= 50_000
    assert len(log._read_spool(10_000)[0]) == 100
    refusals = [r for r in caplog.records if "spool unwritable" in r.getMessage()]
    assert len(refusals) == 1 and "TRIPCAST_LOG_SPOOL_MAX_MB" in refusals[0].getMessage()  # said once


def test_a_long_spool_is_replayed_in_bounded_transactions_and_resumes_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predlog, "REPLAY_ROWS", 400)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    spooled = _rows("spooled", 1000)
    first = PredictionLog(url, tmp_path / "spool")
    first._append_spool(spooled)
    sizes = []
    original = predlog.insert_predictions
    monkeypatch.setattr(predlog, "insert_predictions", lambda conn, rows: (sizes.append(len(rows)),
                                                                             original(conn, rows)))
    assert first._write(_rows("live", 10))  # one write: 400 spooled rows and its own 10, then the process ends
    assert first.spool.exists() and int(first._spool_offset.read_text()) > 0

    second = PredictionLog(url, tmp_path / "spool")  # a restarted server resumes from the offset
    assert second._write([]) and second._write([]) and second.spool.exists() is False
    assert not second._spool_offset.exists() and sizes == [410, 400, 200]
    with connect(url).connect() as conn:
        ids = conn.execute(sa.select(predictions.c.ride_id).order_by(predictions.c.id)).scalars().all()
    # Each transaction's rows in ride_id order, the transactions in the order they were written.
    ids_of = [[r[0] for r in part] for part in (spooled[:400] + _rows("live", 10), spooled[400:800], spooled[800:])]
    assert ids == [i for part in ids_of for i in sorted(part)]
    # A new outage starts a new spool from its beginning, not from the last offset.
    later = _rows("later", 3)
    second._append_spool(later)
    assert second._read_spool(100)[0] == later
    # A spool holding only a line torn by a crash is counted once and removed, not re-read on every flush.
    second.spool.write_text('["torn", "2026-11\n')
    assert second._write([]) and second._write([]) and not second.spool.exists() and second.dropped == 1
    # A line torn without its end (a crash mid-append) costs only itself: the next append starts a new line.
    second.spool.write_text('["torn", "2026-11')
    second._append_spool(later)
    assert second._read_spool(100)[0] == later and second.dropped == 2


def test_a_spool_left_by_tripcast_0_1_is_replayed(tmp_path: Path) -> None:
    """Spools used to hold one JSON object per row with ISO 8601 times; an upgrade must not lose them."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", flush_seconds=0.05)
    old = {"ride_id": "old-1", "logged_at": "2026-11-20T10:00:00.500000", "pickup_datetime": "2021-03-01T08:15:00",
           "PULocationID": 10, "DOLocationID": 50, "trip_distance": 4.2, "prediction": 17.5, "model_version": "2",
           "arm": "champion", "source": "api"}
    log.spool.write_text(json.dumps(old) + "\n" + json.dumps(list(_rows("new", 1)[0])) + "\n")
    log.start()
    log.stop()
    with connect(url).connect() as conn:
        rows = conn.execute(sa.select(predictions).order_by(predictions.c.ride_id)).all()
    assert [r.ride_id for r in rows] == ["new-0", "old-1"] and not log.spool.exists()
    assert rows[1].pickup_datetime == datetime(2021, 3, 1, 8, 15) and rows[1].prediction == 17.5


def test_batch_arms_are_the_single_arms() -> None:
    ids = [f"ride-{i}" for i in range(5000)] + ["x", "ü-ride", "r" * 128]
    assert buckets(ids).tolist() == [bucket(i) for i in ids]
    policy = TrafficPolicy("ab", 0.3)
    arms = policy.arms(ids, challenger_ready=True)
    assert arms.tolist() == [policy.arm(i, True) for i in ids]
    assert abs((arms == CHALLENGER_ARM).mean() - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(ids))
    assert set(policy.arms(ids, challenger_ready=False)) == {"champion"}


def test_ride_columns_take_pickups_as_new_york_time() -> None:
    rides = [RIDE.validate_python(r) for r in (
        {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.5, "pickup_datetime": "2021-03-01T08:00:00"},
        {"PULocationID": 3, "DOLocationID": 4, "trip_distance": 0, "pickup_datetime": "2021-03-01T13:00:00Z"},
        {"PULocationID": 5, "DOLocationID": 6, "trip_distance": 2, "ride_id": "mine"})]
    columns = RideColumns(rides)
    assert columns.pickup[:2].tolist() == [datetime(2021, 3, 1, 8), datetime(2021, 3, 1, 8)]  # 13:00 UTC = 08:00
    assert abs(pd.Timestamp(columns.pickup[2]) - pd.Timestamp.now(tz="America/New_York").tz_localize(None)) \
        < timedelta(seconds=5)
    assert columns.ride_ids[2] == "mine" and len(set(columns.ride_ids)) == 3 and len(columns.ride_ids[0]) == 32
    rows = columns.log_rows(np.array([1.0, 2.0, 3.0]), ["1", "1", "2"], ["champion"] * 3, "api")
    assert [dict(zip(PREDICTION_COLUMNS, r, strict=True))["pickup_datetime"] for r in rows[:2]] == [
        "2021-03-01 08:00:00.000000"] * 2
