"""Streaming on a real Redis: predictions out, dead letters, redelivery after a crash, a Redis restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
import sqlalchemy as sa
from conftest import eventually

from tripcast import training
from tripcast.config import Settings
from tripcast.registry import CHAMPION, Registry, decide
from tripcast.rehearsal import free_port
from tripcast.serving.holder import ModelHolder
from tripcast.serving.predlog import PredictionLog
from tripcast.store import connect, predictions
from tripcast.streaming import StreamConsumer, StreamNames, run_consumer

pytestmark = pytest.mark.slow


@pytest.fixture
def names() -> StreamNames:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    return StreamNames(f"{prefix}:rides", f"{prefix}:predictions", f"{prefix}:dead", f"{prefix}-group")


@pytest.fixture
def client(names: StreamNames) -> Iterator[redis.Redis]:
    r = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    try:
        r.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"the streaming tests need Redis on 127.0.0.1:6379 ({exc})")
    yield r
    r.delete(names.input, names.output, names.dead_letter)


@pytest.fixture
def raw() -> redis.Redis:
    """The consumer's client: events as bytes, as ``tripcast stream`` reads them."""
    return redis.Redis(host="127.0.0.1", port=6379)


@pytest.fixture
def served(settings: Settings) -> dict:
    months = {m: training.read_month_data("green", m, settings)
              for m in ("2021-01", "2021-02")}
    result = training.train(months["2021-01"], months["2021-02"], "baseline", settings)
    registry = Registry(settings)
    registry.apply(registry.register(result.model_uri, result.run_id).version, decide(1.0, None, 2.0, 0.01))
    holder = ModelHolder(registry, CHAMPION)
    assert holder.refresh()
    return {"holder": holder, "rides": months["2021-02"].rides.head(50)}


def _events(rides) -> list[dict]:
    return [{"ride": json.dumps({"PULocationID": int(r.PULocationID), "DOLocationID": int(r.DOLocationID),
                                 "trip_distance": float(r.trip_distance), "ride_id": f"ride-{i}",
                                 "pickup_datetime": r.pickup_datetime.isoformat()})}
            for i, r in enumerate(rides.itertuples())]


def _drain(consumer: StreamConsumer, expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    handled = 0
    while handled < expected and time.monotonic() < deadline:
        handled += consumer.step()


def test_events_in_predictions_out_malformed_to_dead_letter(client, raw, names, served,
                                                            settings: Settings) -> None:
    predlog = PredictionLog(settings.resolved_monitoring_uri, settings.spool_dir, flush_seconds=0.05)
    predlog.start()
    consumer = StreamConsumer(raw, served["holder"], names, block_ms=100, predlog=predlog)
    consumer.ensure_group()
    ids = [client.xadd(names.input, event) for event in _events(served["rides"])]
    bad = {client.xadd(names.input, {"ride": "{not json"}): "ride",
           client.xadd(names.input, {"ride": json.dumps({"PULocationID": 0, "DOLocationID": 5,
                                                         "trip_distance": 1})}): "PULocationID",
           client.xadd(names.input, {"other": "field"}): "ride"}
    not_utf8 = b'{"PULocationID": 10, "ride_id": "\xff"}'  # a consumer that decoded events died on it, every time
    poison = raw.xadd(names.input, {"ride": not_utf8}).decode()
    bad[poison] = "ride"
    _drain(consumer, len(ids) + len(bad))

    out = client.xrange(names.output)
    assert [f["event_id"] for _, f in out] == ids
    expected = served["holder"].current.pipeline.predict(served["rides"])
    np.testing.assert_array_equal([float(f["duration"]) for _, f in out], expected)
    assert {f["model_version"] for _, f in out} == {"1"} and out[0][1]["ride_id"] == "ride-0"
    letters = {f[b"event_id"].decode(): f for _, f in raw.xrange(names.dead_letter)}  # as sent: any bytes
    dead = {event: f[b"error"].decode() for event, f in letters.items()}
    assert letters[poison][b"ride"] == not_utf8
    assert dead.keys() == bad.keys()
    assert all(field in dead[event] for event, field in bad.items())
    assert client.xpending(names.input, names.group)["pending"] == 0

    predlog.stop()  # every published prediction is in the log, once, as the stream's
    with connect(settings.resolved_monitoring_uri).connect() as conn:
        logged = pd.read_sql(sa.select(predictions), conn)
    published = [f["ride_id"] for _, f in out]
    assert sorted(logged["ride_id"]) == sorted(published) and set(logged["source"]) == {"stream"}
    logged = logged.set_index("ride_id").loc[published]  # in publishing order (stored: by ride_id)
    np.testing.assert_array_equal(logged["prediction"], expected)
    assert (logged["pickup_datetime"] == served["rides"]["pickup_datetime"].to_numpy()).all()


def test_pending_events_are_redelivered_after_a_consumer_crash(client, raw, names, served) -> None:
    StreamConsumer(raw, served["holder"], names).ensure_group()
    ids = [client.xadd(names.input, event) for event in _events(served["rides"].head(20))]
    # A consumer reads the events and dies before publishing or acknowledging anything.
    taken = client.xreadgroup(names.group, "crashed-consumer", {names.input: ">"}, count=100)
    assert len(taken[0][1]) == 20 and client.xpending(names.input, names.group)["pending"] == 20
    survivor = StreamConsumer(raw, served["holder"], names, consumer="survivor", claim_idle_ms=200,
                              block_ms=100)
    assert survivor.step() == 0  # too early to claim: the events have not been idle long enough yet
    time.sleep(0.3)
    _drain(survivor, 20)
    assert sorted(f["event_id"] for _, f in client.xrange(names.output)) == sorted(ids)
    assert client.xpending(names.input, names.group)["pending"] == 0


def test_consumers_that_are_gone_leave_the_group(client, raw, names, served) -> None:
    # Each process is a new consumer (host-pid): without this the group's list of consumers only grows.
    def consumers() -> set[bytes]:
        return {c["name"] for c in raw.xinfo_consumers(names.input, names.group)}

    crashed = b"crashed-\xff"  # another program's consumer: its name need not even be UTF-8

    StreamConsumer(raw, served["holder"], names).ensure_group()
    for event in _events(served["rides"].head(5)):
        client.xadd(names.input, event)
    raw.xreadgroup(names.group, crashed, {names.input: ">"}, count=100)  # and dies
    survivor = StreamConsumer(raw, served["holder"], names, consumer="survivor", claim_idle_ms=200,
                              forget_idle_ms=300, block_ms=100)
    time.sleep(0.4)
    # Idle long enough, but its events are pending: it stays, and removing it in the same step as the check
    # is refused (XGROUP DELCONSUMER would drop its pending events unacknowledged).
    assert survivor.forget_idle() == []
    assert survivor._forget(keys=[names.input], args=[names.group, crashed]) == -1
    _drain(survivor, 5)
    assert client.xlen(names.output) == 5 and client.xpending(names.input, names.group)["pending"] == 0
    assert consumers() == {crashed, b"survivor"}
    eventually(lambda: survivor.step() == 0 and consumers() == {b"survivor"})  # its events claimed, it goes
    assert survivor.forgotten == 1

    # A consumer that stops cleanly leaves at once; another one's events stay with it.
    client.xadd(names.input, _events(served["rides"].head(1))[0])
    client.xreadgroup(names.group, "busy-consumer", {names.input: ">"}, count=1)
    stop = threading.Event()
    worker = threading.Thread(target=survivor.run, args=(stop,), daemon=True)
    worker.start()
    stop.set()
    worker.join(timeout=10)
    assert consumers() == {b"busy-consumer"}
    assert client.xpending(names.input, names.group)["pending"] == 1



def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                                "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync",
                                "always", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    for _ in range(100):
        try:
            probe.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def test_the_streams_the_consumer_writes_are_capped(client, raw, names, served) -> None:
    consumer = StreamConsumer(raw, served["holder"], names, block_ms=100, max_len=10)
    consumer.ensure_group()
    rides = _events(pd.concat([served["rides"]] * 10))  # 500 events
    for event in rides:
        client.xadd(names.input, event)
    for _ in range(300):
        client.xadd(names.input, {"ride": "{not json"})
    _drain(consumer, 800)
    assert consumer.published == 500 and consumer.dead == 300
    # Approximate trimming keeps whole nodes of up to 100 entries: far fewer than were written, at least 10.
    assert 10 <= client.xlen(names.output) <= 200 and 10 <= client.xlen(names.dead_letter) <= 200
    assert client.xrevrange(names.output, count=1)[0][1]["ride_id"] == "ride-499"  # the newest are kept


def test_the_stream_process_waits_for_a_champion_then_consumes(client, names, settings: Settings, caplog) -> None:
    # In the production profile the consumer starts before the first training run: it waits, then serves.
    caplog.set_level("WARNING", logger="tripcast.streaming")
    stop = threading.Event()
    worker = threading.Thread(target=run_consumer, daemon=True, args=(
        settings.with_overrides(poll_seconds=0.2, log_flush_seconds=0.1), "redis://127.0.0.1:6379/0", names, stop))
    worker.start()
    try:
        event = _events(training.read_month_data("green", "2021-02", settings).rides.head(1))[0]
        client.xadd(names.input, event)
        time.sleep(1.0)
        assert worker.is_alive() and client.xlen(names.output) == 0  # no model yet: nothing consumed
        months = [training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02")]
        result = training.train(months[0], months[1], "baseline", settings)
        registry = Registry(settings)
        registry.apply(registry.register(result.model_uri, result.run_id).version, decide(1.0, None, 2.0, 0.01))
        eventually(lambda: client.xlen(names.output) == 1, ignoring=(redis.ConnectionError,))
        assert client.xrange(names.output)[0][1]["ride_id"] == "ride-0"
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    # Said once, not at each of the polls while it waited.
    assert sum("version to serve yet" in r.getMessage() for r in caplog.records) == 1


def test_consumer_survives_a_redis_restart(names, served, tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="tripcast.streaming")
    port = free_port()
    server = _start_redis(port, tmp_path)
    client = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
    consumer = StreamConsumer(redis.Redis(port=port, socket_timeout=2), served["holder"], names, block_ms=100)
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    events = _events(served["rides"].head(20))
    try:
        for event in events[:10]:
            client.xadd(names.input, event)
        eventually(lambda: client.xlen(names.output) == 10, ignoring=(redis.ConnectionError,))
        server.terminate()
        server.wait(timeout=10)
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port).ping()  # really down
        time.sleep(3.0)  # longer than the client's own retries: the consumer has to wait it out
        server = _start_redis(port, tmp_path)
        for event in events[10:]:
            client.xadd(names.input, event)
        eventually(lambda: client.xlen(names.output) == 20, ignoring=(redis.ConnectionError,))
        assert worker.is_alive()
        assert client.xpending(names.input, names.group)["pending"] == 0
    finally:
        stop.set()
        worker.join(timeout=10)
        server.terminate()
        server.wait(timeout=10)
    # The outage in the log once when it began and once when it ended, not at each of the consumer's retries.
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("redis")]
    assert len(said) == 2 and said[0].startswith("redis unavailable") and said[1].startswith("redis answers again")


def test_consumer_recreates_its_group_when_redis_lost_its_data(client, raw, names, served) -> None:
    # A Redis restarted without persistence (or a stream deleted by hand) comes back without the consumer
    # group: the consumer makes it again and goes on, instead of dying on NOGROUP.
    consumer = StreamConsumer(raw, served["holder"], names, block_ms=100)
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    events = _events(served["rides"].head(10))
    try:
        client.xadd(names.input, events[0])
        eventually(lambda: client.xlen(names.output) == 1, ignoring=(redis.ConnectionError,))
        client.delete(names.input)  # the stream and its group are gone
        time.sleep(0.3)  # the consumer meets NOGROUP
        ids = [client.xadd(names.input, event) for event in events[1:]]
        eventually(lambda: client.xlen(names.output) == 10, ignoring=(redis.ConnectionError,))
        assert worker.is_alive() and consumer.regrouped >= 1
        assert [f["event_id"] for _, f in client.xrange(names.output)][1:] == ids
        assert client.xpending(names.input, names.group)["pending"] == 0
    finally:
        stop.set()
        worker.join(timeout=10)




def test_the_stream_process_flushes_its_log_and_leaves_on_sigterm(client, names, served,
                                                                   settings: Settings) -> None:
    # docker stop and Kubernetes stop a service with SIGTERM. The process used to die at once, and with it the
    # log rows of events it had already published and acknowledged (a long flush interval keeps them queued).
    command = [sys.executable, "-m", "tripcast", "stream", "--input", names.input, "--output", names.output,
               "--dead-letter", names.dead_letter, "--group", names.group]
    process = subprocess.Popen(command, env=os.environ | {"TRIPCAST_LOG_FLUSH_SECONDS": "60"},
                               stderr=subprocess.PIPE, text=True)
    try:
        for event in _events(served["rides"]):
            client.xadd(names.input, event)
        eventually(lambda: client.xlen(names.output) == 50, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    with connect(settings.resolved_monitoring_uri).connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    assert logged == 50
    assert client.xinfo_consumers(names.input, names.group) == []  # it left the group
    said = process.stderr.read()
    assert "consuming" in said and "stopped: 50 predictions published, 0 events dead-lettered, 50 rows logged" in said
