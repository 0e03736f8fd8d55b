"""The prediction log's rows, their insert into a real store, the writer's bound, and the traffic policy's
vectorised arm (the API's batch path must send a ride where its single path sends it)."""

from __future__ import annotations

import hashlib
import json
import os
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

from tripcast.serving import journal, predlog
from tripcast.serving.predlog import PredictionLog
from tripcast.serving.schemas import RIDE, RideColumns
from tripcast.serving.traffic import CHALLENGER_ARM, TrafficPolicy, bucket, buckets
from tripcast.store import (
    OBSOLETE_INDEXES,
    PREDICTION_COLUMNS,
    connect,
    insert_predictions,
    journal_offsets,
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


def _stored(url: str) -> pd.DataFrame:
    engine = connect(url)
    with engine.connect() as conn:
        frame = pd.read_sql(sa.select(predictions), conn)
    engine.dispose()
    return frame


def _offsets(url: str) -> dict[str, int]:
    engine = connect(url)
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(journal_offsets.c.journal, journal_offsets.c.position)).all())
    engine.dispose()
    return found


def _until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.02)


def test_the_writer_writes_from_memory_and_reads_back_what_memory_did_not_keep(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger=predlog.__name__)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", queue_size=1000, batch_size=300, flush_seconds=0.05,
                        shadow=lambda rows: ([1.5] * len(rows), "4"))
    first = log.put(_rows("first", 900))
    log.put(_rows("over", 200))  # 900 + 200 > 1000: journaled only, read back by the writer
    log.put(_rows("more", 50))  # 900 + 50 <= 1000: kept, after a gap the writer reads from the journal
    assert log.depth == 950 and log.dropped == 0 and first > 0
    in_file = log.journal.segment.read(0, log.journal.size, 10_000)[0]  # all of it is in the file already
    assert [r[0] for r in in_file] == [r[0] for r in _rows("first", 900) + _rows("over", 200) + _rows("more", 50)]
    log.start()
    _until(lambda: log.written >= 1150)
    log.put(_rows("second", 100))
    log.stop()  # writes what is journaled
    logged = _stored(url)
    assert log.written == 1250 and log.replayed == 200 and log.depth == 0 and log.store_up and log.dropped == 0
    ids = logged["ride_id"]
    assert len(ids) == ids.nunique() == 1250
    for prefix, count in (("first", 900), ("over", 200), ("more", 50), ("second", 100)):
        assert ids.str.startswith(prefix + "-").sum() == count
    assert (logged["shadow_prediction"] == 1.5).all() and (logged["shadow_version"] == "4").all()
    # Stopped with everything in the store: its journal and its recorded offset are gone.
    assert list((tmp_path / "spool").glob("journal-*")) == [] and _offsets(url) == {}
    assert [r.getMessage()[:50] for r in caplog.records if r.name == predlog.__name__] == [
        "prediction log: predictions come faster than the s",  # ... rows past the queue wait in the journal
        "prediction log: the store has caught up (the journ"]


def test_while_the_store_is_down_predictions_wait_in_the_journal(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger=predlog.__name__)
    folder = tmp_path / "not-yet"  # SQLite cannot open a file in a folder that does not exist: the store is down
    url = f"sqlite:///{folder / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", batch_size=100, flush_seconds=0.05)
    log.put(_rows("backlog", 1000))
    log.start()
    _until(lambda: not log.store_up)
    time.sleep(0.3)  # several wakes: the outage is said once
    assert log.written == 0 and log.backlog_bytes == log.journal.appended > 0
    folder.mkdir()  # the store comes back
    _until(lambda: log.written == 1000)
    log.stop()
    assert len(_stored(url)) == 1000 and log.store_up and log.dropped == 0 and log.backlog_bytes == 0
    assert [r.getMessage()[:40] for r in caplog.records if r.name == predlog.__name__] == [
        "prediction log: store unavailable, predi", "prediction log: the store answers again "]


def test_rows_read_back_from_the_journal_get_their_shadow_predictions(tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"  # the store is down at first: every row is read back
    url = f"sqlite:///{folder / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", queue_size=100, flush_seconds=0.05,
                        shadow=lambda rows: ([2.5] * len(rows), "7"))
    log.put(_rows("queued", 100))
    log.put(_rows("over", 50))  # past the queue
    log.start()
    _until(lambda: not log.store_up)
    folder.mkdir()
    _until(lambda: log.written == 150)
    log.stop()
    logged = _stored(url)
    assert len(logged) == 150 and (logged["shadow_prediction"] == 2.5).all() and (logged["shadow_version"] == "7").all()


def test_the_journal_stops_at_its_size_limit_and_counts_what_it_refuses(tmp_path: Path, caplog) -> None:
    # A long outage must not fill the disk the store, MLflow and the service share.
    caplog.set_level("WARNING", logger=predlog.__name__)
    url = f"sqlite:///{tmp_path / 'not-yet' / 'store.db'}"  # the store is down throughout
    log = PredictionLog(url, tmp_path / "spool", batch_size=1000, flush_seconds=0.05, spool_max_mb=0.05)
    log.start()
    assert log.put(_rows("kept", 100)) > 0  # ~13 kB: within the 50 kB
    assert log.put(_rows("refused", 900)) == 0  # ~120 kB more: refused whole, counted
    assert log.put(_rows("refused-too", 900)) == 0
    _until(lambda: any("refuses rows" in r.getMessage() for r in caplog.records))
    time.sleep(0.2)
    log.stop()
    assert log.dropped == 1800 and log.journal.size <= 50_000
    orphan = next((tmp_path / "spool").glob("journal-*"))  # left for the next process: the store never came
    assert [r[0] for r in journal.Segment(orphan).read(0, 10**9, 10**6)[0]] == [r[0] for r in _rows("kept", 100)]
    refusals = [r for r in caplog.records if "refuses rows" in r.getMessage()]
    assert len(refusals) == 1 and "TRIPCAST_LOG_SPOOL_MAX_MB" in refusals[0].getMessage()  # said once


# A serving process in miniature: journals numbered rows, a request at a time, and says which are answered.
JOURNALING = """
import sys, time
from pathlib import Path
from tripcast.serving import journal, predlog
from tripcast.serving.predlog import PredictionLog
from tripcast.store import log_time
predlog.ROTATE_BYTES = 1 << 30
log = PredictionLog(sys.argv[1], Path(sys.argv[2]), batch_size=int(sys.argv[3]), flush_seconds=0.02)
log.start()
for n in range(1_000_000):
    log.put([(f"r-{n}-{k}", log_time(), log_time(), 1, 2, 1.0, 2.0, "1", "champion", "api", None, None)
             for k in range(20)])
    print(n, flush=True)  # answered: its rows are journaled
    time.sleep(0.0005)
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_journal_left_by_a_killed_process_is_replayed_exactly_once(backend: str, tmp_path: Path,
                                                                     postgres_database, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else postgres_database()
    spool = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", JOURNALING, url, str(spool), "300"], stdout=subprocess.PIPE,
                             text=True)
    _until(lambda: _offsets(url) if (tmp_path / "store.db").exists() or backend != "sqlite" else False, 30)
    time.sleep(0.5)  # many transactions in, and more journaled than written
    child.kill()  # SIGKILL: no flush, no goodbye
    child.wait()
    answered = [int(line) for line in child.stdout.read().split()]
    before = len(_stored(url))
    assert answered and before < 20 * (answered[-1] + 1)  # killed with answered rows not yet in the store
    sizes = []
    original = predlog.insert_predictions
    monkeypatch.setattr(predlog, "insert_predictions", lambda conn, rows: (sizes.append(len(rows)),
                                                                             original(conn, rows)))
    monkeypatch.setattr(predlog, "REPLAY_ROWS", 1000)
    survivor = PredictionLog(url, spool, flush_seconds=0.05)  # the restarted server, or a sibling worker
    survivor.start()
    _until(lambda: not list(spool.glob(f"journal-*-{child.pid}-*")), 30)
    survivor.stop()
    ids = _stored(url)["ride_id"]
    wanted = {f"r-{n}-{k}" for n in answered for k in range(20)}
    assert wanted <= set(ids) and ids.is_unique  # every answered row, none twice
    assert max(sizes) <= 1000 and survivor.replayed == len(ids) - before  # bounded transactions
    assert _offsets(url) == {} and list(spool.iterdir()) == []


def test_a_journal_file_past_its_size_is_sealed_and_removed_once_in_the_store(tmp_path: Path, monkeypatch) -> None:
    # Under steady load the writer is never all caught up: the files must still turn over, or the journal
    # would grow until its limit and then drop rows.
    monkeypatch.setattr(predlog, "ROTATE_BYTES", 20_000)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    log = PredictionLog(url, tmp_path / "spool", flush_seconds=0.02)
    first = log.journal.segment.name
    log.put(_rows("a", 300))  # ~40 kB: sealed at once, and a new file started
    assert log.journal.segment.name != first and [s.name for s, _ in log.journal.sealed] == [first]
    log.put(_rows("b", 10))
    log.start()
    _until(lambda: log.written == 310)
    assert [p.name for p in (tmp_path / "spool").glob("journal-*")] == [log.journal.segment.name]
    assert set(_offsets(url)) == {log.journal.segment.name} and log.backlog_bytes == 0
    log.stop()
    assert _stored(url)["ride_id"].is_unique and len(_stored(url)) == 310


def test_with_fsync_always_waiting_requests_share_syncs(tmp_path: Path, monkeypatch) -> None:
    syncs = []
    real = os.fsync
    monkeypatch.setattr(journal.os, "fsync", lambda fd: (syncs.append(fd), time.sleep(0.002), real(fd)))
    log = PredictionLog(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "spool", fsync="always")

    def request(n: int) -> bool:
        offset = log.put(_rows(f"req{n}", 1))
        log.wait_durable(offset)
        return log.journal.synced >= offset

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(request, range(400)))
    assert 0 < len(syncs) < 400 / 2  # group commits: far fewer syncs than answers
    log.start()
    log.stop()


def test_a_spool_left_by_an_earlier_tripcast_is_replayed_from_its_offset(tmp_path: Path) -> None:
    """Spools used to hold one row per line (a JSON object with ISO 8601 times before that), with the bytes
    already replayed in a file beside them; an upgrade must not lose them, nor replay them twice."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    spool = tmp_path / "spool"
    spool.mkdir()
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    done = json.dumps(list(_rows("done", 1)[0])) + "\n"  # replayed before the upgrade
    old = {"ride_id": "old-1", "logged_at": "2026-11-20T10:00:00.500000", "pickup_datetime": "2021-03-01T08:15:00",
           "PULocationID": 10, "DOLocationID": 50, "trip_distance": 4.2, "prediction": 17.5, "model_version": "2",
           "arm": "champion", "source": "api"}
    (spool / f"predictions-{key}.jsonl").write_text(done + json.dumps(old) + "\n" +
                                                    json.dumps(list(_rows("new", 1)[0])) + "\n")
    (spool / f"predictions-{key}.offset").write_text(str(len(done)))
    log = PredictionLog(url, spool, flush_seconds=0.05)
    log.start()
    _until(lambda: log.written == 2)
    log.stop()
    rows = _stored(url).sort_values("ride_id")
    assert rows["ride_id"].tolist() == ["new-0", "old-1"] and list(spool.iterdir()) == []
    assert rows.iloc[1]["pickup_datetime"] == datetime(2021, 3, 1, 8, 15) and rows.iloc[1]["prediction"] == 17.5


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
    columns = RideColumns.from_rides(rides)
    assert columns.pickup[:2].tolist() == [datetime(2021, 3, 1, 8), datetime(2021, 3, 1, 8)]  # 13:00 UTC = 08:00
    assert abs(pd.Timestamp(columns.pickup[2]) - pd.Timestamp.now(tz="America/New_York").tz_localize(None)) \
        < timedelta(seconds=5)
    assert columns.ride_ids[2] == "mine" and len(set(columns.ride_ids)) == 3 and len(columns.ride_ids[0]) == 32
    rows = columns.log_rows(np.array([1.0, 2.0, 3.0]), ["1", "1", "2"], ["champion"] * 3, "api")
    assert [dict(zip(PREDICTION_COLUMNS, r, strict=True))["pickup_datetime"] for r in rows[:2]] == [
        "2021-03-01 08:00:00.000000"] * 2
