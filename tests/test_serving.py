"""The API as a real server process (uvicorn on a free port) against a real MLflow registry and store."""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import eventually, module_environment
from pydantic import ValidationError

from tripcast import training
from tripcast.config import Settings
from tripcast.errors import ModelVerificationError
from tripcast.registry import CHALLENGER, CHAMPION, Registry, decide
from tripcast.rehearsal import ApiProcess as Server
from tripcast.rehearsal import free_port
from tripcast.store import connect, predictions

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token"
COURSE_RIDE = {"PULocationID": 10, "DOLocationID": 50, "trip_distance": 40}
HERE = Path(__file__).parent



@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path) -> Iterator[dict]:
    """A registry with version 1 (champion) and version 2 (challenger), and the rides of 2021-02."""
    home = tmp_path_factory.mktemp("serving") / "home"
    with module_environment(home, tlc_mirror, TRIPCAST_ADMIN_TOKEN=TOKEN) as (settings, env):
        yield _world(settings, env)


def _world(settings: Settings, env: dict[str, str]) -> dict:
    months = {m: training.read_month_data("green", m, settings)
              for m in ("2021-01", "2021-02")}
    registry = Registry(settings)
    versions = []
    for trees in (60, 200):
        result = training.train(months["2021-01"], months["2021-02"], "lightgbm", settings,
                                params={"n_estimators": trees})
        versions.append(str(registry.register(result.model_uri, result.run_id).version))
    registry.apply(versions[0], decide(1.0, None, 7.0, 0.01))
    registry.client.set_registered_model_alias(settings.model_name, CHALLENGER, versions[1])
    pipelines = {v: registry.load_pipeline(v)[1] for v in versions}
    return {"settings": settings, "env": env, "registry": registry, "versions": versions, "pipelines": pipelines,
            "rides": months["2021-02"].rides}


@pytest.fixture(scope="module")
def server(world: dict) -> Iterator[Server]:
    srv = Server(world["env"])
    yield srv
    srv.stop()


def _requests(rides: pd.DataFrame, prefix: str) -> list[dict]:
    return [{"PULocationID": int(r.PULocationID), "DOLocationID": int(r.DOLocationID),
             "trip_distance": float(r.trip_distance), "ride_id": f"{prefix}-{i}",
             "pickup_datetime": r.pickup_datetime.isoformat()}
            for i, r in enumerate(rides.itertuples())]


def _logged(settings: Settings, prefix: str, expected: int, timeout: float = 15, url: str | None = None):
    engine = connect(url or settings.resolved_monitoring_uri)
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            rows = pd.read_sql(sa.select(predictions).where(predictions.c.ride_id.like(f"{prefix}-%")), conn)
        if len(rows) >= expected or time.monotonic() > deadline:
            engine.dispose()
            # In request order ("<prefix>-<n>"): the log stores each transaction's rows in ride_id order.
            return rows.iloc[rows["ride_id"].str.removeprefix(f"{prefix}-").astype(int).argsort()]
        time.sleep(0.2)


def test_predictions_equal_the_registry_model(world: dict, server: Server) -> None:
    rides = world["rides"].sample(300, random_state=1)
    expected = world["pipelines"][world["versions"][0]].predict(rides)
    body = _requests(rides, "exact")
    batch = httpx.post(f"{server.url}/predict/batch", json={"rides": body}, timeout=30)
    assert batch.status_code == 200 and batch.headers["X-Model-Version"] == world["versions"][0]
    assert [p["duration"] for p in batch.json()["predictions"]] == expected.tolist()
    singles = [httpx.post(f"{server.url}/predict", json=ride, timeout=10) for ride in body[:25]]
    assert [r.json()["duration"] for r in singles] == expected[:25].tolist()
    assert {r.headers["X-Model-Version"] for r in singles} == {world["versions"][0]}
    assert singles[0].json()["ride_id"] == "exact-0" and singles[0].json()["model"] == {
        "name": world["settings"].model_name, "version": world["versions"][0], "alias": CHAMPION}

    rows = _logged(world["settings"], "exact", 325)
    assert len(rows) == 325 and set(rows["model_version"]) == {world["versions"][0]}
    assert set(rows["arm"]) == {"champion"} and rows["shadow_prediction"].isna().all()


def test_the_course_request_works_unchanged(server: Server) -> None:
    response = httpx.post(f"{server.url}/predict", json=COURSE_RIDE, timeout=10)
    assert response.status_code == 200
    assert 1 < response.json()["duration"] < 120 and len(response.json()["ride_id"]) == 32


@pytest.mark.parametrize(("payload", "field"), [
    ({**COURSE_RIDE, "PULocationID": 0}, "PULocationID"),
    ({**COURSE_RIDE, "DOLocationID": 266}, "DOLocationID"),
    ({**COURSE_RIDE, "DOLocationID": "50"}, "DOLocationID"),
    ({**COURSE_RIDE, "PULocationID": 10.5}, "PULocationID"),
    ({**COURSE_RIDE, "PULocationID": True}, "PULocationID"),
    ({**COURSE_RIDE, "DOLocationID": 265.5}, "DOLocationID"),
    ({**COURSE_RIDE, "trip_distance": -1}, "trip_distance"),
    ({**COURSE_RIDE, "trip_distance": 5000}, "trip_distance"),
    ({**COURSE_RIDE, "trip_distance": "far"}, "trip_distance"),
    ({**COURSE_RIDE, "trip_distance": None}, "trip_distance"),
    ({**COURSE_RIDE, "pickup_datetime": "yesterday"}, "pickup_datetime"),
    ({**COURSE_RIDE, "pickup_datetime": "0422-05-27T01:07:31+17:21"}, "pickup_datetime"),  # found by the fuzz
    ({**COURSE_RIDE, "pickup_datetime": "6269-02-14T17:44:35Z"}, "pickup_datetime"),
    ({**COURSE_RIDE, "ride_id": "a\x00b"}, "ride_id"),  # PostgreSQL cannot store it
    ({**COURSE_RIDE, "surge": 2}, "surge"),
    ({"PULocationID": 10, "DOLocationID": 50}, "trip_distance"),
])
def test_bad_input_is_a_422_naming_the_field(server: Server, payload: dict, field: str) -> None:
    response = httpx.post(f"{server.url}/predict", json=payload, timeout=10)
    assert response.status_code == 422
    assert field in [loc for error in response.json()["detail"] for loc in error["loc"]]


@pytest.mark.parametrize(("content", "field"), [
    ('{"PULocationID": 10, "DOLocationID": 50, "trip_distance": NaN}', "trip_distance"),
    ('{"PULocationID": 10, "DOLocationID": 50, "trip_distance": Infinity}', "trip_distance"),
    ('{"PULocationID": 10, "DOLocationID": 50', "body"),
    ("[1, 2]", "body"),
])
def test_malformed_json_and_non_finite_numbers_are_422(server: Server, content: str, field: str) -> None:
    response = httpx.post(f"{server.url}/predict", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert field in [loc for error in response.json()["detail"] for loc in error["loc"]]


def test_a_zone_written_as_a_whole_float_is_that_zone(server: Server) -> None:
    # JSON does not tell 10 from 10.0 (the schema says "integer", which includes 10.0), and a pandas column
    # with a gap serialises zones as floats.
    as_int = httpx.post(f"{server.url}/predict", json={**COURSE_RIDE, "ride_id": "int-zone"}, timeout=10)
    as_float = httpx.post(f"{server.url}/predict", timeout=10, headers={"content-type": "application/json"},
                          content='{"PULocationID": 10.0, "DOLocationID": 5e1, "trip_distance": 40, "ride_id": "f"}')
    assert as_float.status_code == 200 and as_float.json()["duration"] == as_int.json()["duration"]
    batch = httpx.post(f"{server.url}/predict/batch", json={"rides": [{**COURSE_RIDE, "PULocationID": 10.0}]})
    assert batch.json()["predictions"][0]["duration"] == as_int.json()["duration"]
    bad = httpx.post(f"{server.url}/predict", json={**COURSE_RIDE, "PULocationID": "10"}, timeout=10)
    assert bad.json()["detail"] == [{"loc": ["body", "PULocationID"], "type": "zone_id",
                                     "msg": "Input should be a taxi zone: a whole number from 1 to 265"}]


def test_plausible_years_are_in_the_schema_as_in_the_validator() -> None:
    from tripcast.serving.schemas import RIDE, YEARS_PATTERN

    for year in (2008, 2009, 2010, 2099, 2100, 2101, 1999, 3000):
        text = f"{year}-06-01T12:00:00"
        documented = re.match(YEARS_PATTERN, text) is not None
        try:
            RIDE.validate_python({**COURSE_RIDE, "pickup_datetime": text})
            accepted = True
        except ValidationError:
            accepted = False
        assert documented == accepted == (2009 <= year <= 2100), year


def test_batch_limits(world: dict, server: Server) -> None:
    assert httpx.post(f"{server.url}/predict/batch", json={"rides": []}).status_code == 422
    too_many = {"rides": [COURSE_RIDE] * (world["settings"].batch_limit + 1)}
    response = httpx.post(f"{server.url}/predict/batch", json=too_many, timeout=30)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "rides"]


@pytest.mark.parametrize(("label", "field"), [
    ({"ride_id": "x", "duration": 0}, "duration"),
    ({"ride_id": "x", "duration": float("inf")}, "duration"),
    ({"ride_id": "x", "dropoff_datetime": "0001-01-01T00:01:00+00:00"}, "dropoff_datetime"),  # found by the fuzz
    ({"ride_id": "x", "dropoff_datetime": "9999-12-31T23:59:59"}, "dropoff_datetime"),
    ({"ride_id": "", "duration": 3}, "ride_id"),
    ({"ride_id": "a\x00b", "duration": 3}, "ride_id"),
    ({"ride_id": "x"}, "labels"),
    ({"ride_id": "x", "duration": 3, "dropoff_datetime": "2021-03-01T10:00:00"}, "labels"),
])
def test_bad_labels_are_a_422_naming_the_field(server: Server, label: dict, field: str) -> None:
    response = httpx.post(f"{server.url}/feedback", content=json.dumps({"labels": [label]}),
                          headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert response.status_code == 422
    assert field in [loc for error in response.json()["detail"] for loc in error["loc"]]


def test_a_body_past_the_limit_is_a_413_before_it_is_read_whole(world: dict, server: Server) -> None:
    limit = max(1 << 20, 2048 * world["settings"].batch_limit)
    padded = b'{"rides": [' + b" " * limit + b"]}"  # declared length over the limit
    response = httpx.post(f"{server.url}/predict/batch", content=padded, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and f"the limit is {limit:,}" in response.json()["detail"]
    chunked = (b" " * 65536 for _ in range(limit // 65536 + 2))  # no declared length: counted as it arrives
    response = httpx.post(f"{server.url}/predict", content=chunked, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]
    assert httpx.post(f"{server.url}/predict", json=COURSE_RIDE, timeout=10).status_code == 200  # still serving


def test_a_feedback_body_that_is_not_utf8_json_is_a_422(server: Server) -> None:
    response = httpx.post(f"{server.url}/feedback", content=b'{"labels": "\xff\xfe"}',
                          headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body"]


def test_without_a_model_predictions_are_503_naming_the_alias(world: dict) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(port)],
                               env=os.environ | world["env"] | {"TRIPCAST_SERVE_ALIAS": "nobody"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, 60, (httpx.TransportError,))
        assert httpx.get(f"{url}/ready").status_code == 503
        for path, body in (("/predict", COURSE_RIDE), ("/predict/batch", {"rides": [COURSE_RIDE]})):
            response = httpx.post(f"{url}{path}", json=body)
            assert response.status_code == 503 and "'nobody'" in response.json()["detail"], path
    finally:
        process.terminate()
        _, said = process.communicate(timeout=30)
    # It says once what it waits for, rather than only its banner.
    assert said.count("no version behind alias nobody of tripcast-duration yet: waiting for one") == 1, said




def test_an_api_started_before_its_registry_says_so_then_follows_it(world: dict) -> None:
    # The production profile's registry is an MLflow server: the API must start without it (health up, not
    # ready, the reason in /ready), then serve the champion once the registry answers.
    mlflow_port, port = free_port(), free_port()
    env = os.environ | world["env"] | {"TRIPCAST_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
    api = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, registry = f"http://127.0.0.1:{port}", None
    try:
        started = time.monotonic()
        eventually(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, 60, (httpx.TransportError,))
        assert time.monotonic() - started < 30  # MLflow's own retries back off for minutes
        ready = httpx.get(f"{url}/ready")
        reason = ready.json()["last_reload_error"]
        assert ready.status_code == 503 and "could not read the alias 'champion' from the registry" in reason
        registry = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", world["settings"].resolved_tracking_uri], env=os.environ | world["env"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(lambda: httpx.get(f"{url}/ready", timeout=1).status_code == 200, 90, (httpx.TransportError,))
        ride = {**COURSE_RIDE, "pickup_datetime": "2021-02-03T08:15:00"}
        answer = httpx.post(f"{url}/predict", json=ride, timeout=10)
        expected = world["pipelines"][world["versions"][0]].predict(pd.DataFrame([ride]))[0]
        assert answer.headers["X-Model-Version"] == world["versions"][0] and answer.json()["duration"] == expected
    finally:
        for process in (api, registry):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    # Polled every 0.3 s while the registry was down: one warning when it started, one when it ended.
    log = api.stderr.read()
    assert log.count("reload failed") == 1 and log.count("recovered, serving") == 1 and "Retrying" not in log


def test_metrics_of_several_workers_add_up_whichever_answers_the_scrape(world: dict) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(port), "--workers", "2"],
                           env=os.environ | world["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def scrape() -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
        return {s.name + str(sorted(s.labels.items())): s.value for f in families for s in f.samples}

    try:
        eventually(lambda: httpx.get(f"{url}/ready", timeout=1).status_code == 200, 90, (httpx.TransportError,))
        eventually(lambda: len({httpx.get(f"{url}/model", timeout=10).json()["worker"] for _ in range(8)}) == 2, 60)
        # The first scrape counts the worker that did not answer it too: its figures used to be those of its
        # own last scrape (here: none, so "store down" and one reload for the two workers). Each worker
        # publishes its figures every second.
        time.sleep(2.5)
        first = scrape()
        assert first["tripcast_log_store_up[]"] == 1 and first["tripcast_model_reloads[('alias', 'champion')]"] == 2
        rides = [{**COURSE_RIDE, "ride_id": f"workers-{i}"} for i in range(300)]
        with ThreadPoolExecutor(8) as pool:  # a new connection each: the kernel spreads them over both workers
            codes = list(pool.map(lambda r: httpx.post(f"{url}/predict", json=r, timeout=10).status_code, rides))
        assert codes == [200] * 300
        for _ in range(6):  # each scrape lands on either worker, and must count both
            figures = scrape()
            served = {k: v for k, v in figures.items() if k.startswith("tripcast_requests_total")
                      and "('path', '/predict')" in k}
            predicted = sum(v for k, v in figures.items() if k.startswith("tripcast_predictions_total"))
            assert list(served.values()) == [300.0] and "('status', '200')" in next(iter(served))
            assert predicted == 300.0
        eventually(lambda: scrape()["tripcast_log_written[]"] == 300)  # both workers' writers, however scraped
    finally:
        api.terminate()
        api.wait(timeout=30)
    assert "Traceback" not in api.stderr.read().decode()


def test_a_reload_asked_of_one_worker_reaches_every_worker(world: dict, server: Server) -> None:
    # /admin/reload (a registry webhook) reaches whichever worker answers it; the others must not wait for
    # their next poll (an hour here) to serve the new champion.
    old, new = world["versions"]
    registry: Registry = world["registry"]
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(port), "--workers", "2"],
                           env=os.environ | world["env"] | {"TRIPCAST_POLL_SECONDS": "3600"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def served() -> set[str]:
        with ThreadPoolExecutor(8) as pool:  # a new connection each: the kernel spreads them over both workers
            return set(pool.map(lambda _: httpx.post(f"{url}/predict", json=COURSE_RIDE, timeout=10)
                                .headers["X-Model-Version"], range(40)))

    try:
        eventually(lambda: httpx.get(f"{url}/ready", timeout=1).status_code == 200, 90, (httpx.TransportError,))
        assert served() == {old}
        def workers() -> set[int]:
            with ThreadPoolExecutor(8) as pool:
                return set(pool.map(lambda _: httpx.get(f"{url}/model", timeout=10).json()["worker"], range(40)))

        eventually(lambda: len(workers()) == 2, 20)  # both answer: the checks below see both
        registry.client.set_registered_model_alias(registry.name, CHAMPION, new)
        reload = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert reload.json()[CHAMPION] == {
            "changed": True, "version": new, "last_reload_error": None}
        eventually(lambda: served() == {new}, 10)
    finally:
        registry.client.set_registered_model_alias(registry.name, CHAMPION, old)
        api.terminate()
        api.wait(timeout=30)
    # The module's server follows the alias back before the next test.
    eventually(lambda: httpx.get(f"{server.url}/model").json()[CHAMPION]["serving"]["version"] == old, 15)


def test_admin_needs_the_token(server: Server) -> None:
    assert httpx.post(f"{server.url}/admin/reload").status_code == 401
    assert httpx.post(f"{server.url}/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
    ok = httpx.post(f"{server.url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()[CHAMPION]["changed"] is False


def test_reload_takes_an_mlflow_webhook_signed_with_the_admin_token(server: Server) -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature  # how MLflow signs its deliveries

    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-11-24T03:00:00",
                       "data": {"name": "tripcast-duration", "alias": "champion", "version": "1"}})

    def deliver(secret: str, age: int = 0, sent: str = body) -> httpx.Response:
        delivery, timestamp = str(uuid.uuid4()), str(int(time.time()) - age)
        return httpx.post(f"{server.url}/admin/reload", content=sent, timeout=30, headers={
            "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, timestamp, body)})

    signed = deliver(TOKEN)
    assert signed.status_code == 200 and signed.json()[CHAMPION]["changed"] is False
    for refused, problem in ((deliver("another-secret"), "signature does not match"),
                             (deliver(TOKEN, sent=body.replace('"1"', '"2"')), "signature does not match"),
                             (deliver(TOKEN, age=3600), "s off (more than 300 s)")):
        assert refused.status_code == 403 and problem in refused.json()["detail"]


def test_hot_swap_under_load_fails_no_request(world: dict, server: Server) -> None:
    old, new = world["versions"]
    registry: Registry = world["registry"]
    results: list[tuple[float, int, str, str]] = []
    stop = threading.Event()

    def fire(worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                started, ride_id = time.monotonic(), f"swap-{worker * 1_000_000 + i}"
                try:
                    r = client.post(f"{server.url}/predict", json={**COURSE_RIDE, "ride_id": ride_id})
                    results.append((started, r.status_code, r.headers.get("X-Model-Version", ""), ride_id))
                except httpx.TransportError as exc:
                    results.append((started, 0, repr(exc), ride_id))
                i += 1

    with ThreadPoolExecutor(8) as pool:
        for worker in range(8):
            pool.submit(fire, worker)
        time.sleep(1.0)
        registry.promote(new, reason="hot swap test")
        swapped_at = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            served = httpx.get(f"{server.url}/model").json()[CHAMPION]["serving"]["version"]
            if served == new:
                swapped_at = time.monotonic()
                break
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
    assert swapped_at is not None, "the server never switched to the new champion"
    assert len(results) > 200
    assert [r for r in results if r[1] != 200] == []
    assert {r[2] for r in results} == {old, new}
    assert {r[2] for r in results if r[0] > swapped_at} == {new}
    # Every answer of the load is in the prediction log, once, with the version that gave it.
    logged = _logged(world["settings"], "swap", len(results))
    assert len(logged) == len(results)
    assert dict(zip(logged["ride_id"], logged["model_version"], strict=True)) == {r[3]: r[2] for r in results}


def test_a_version_that_cannot_be_verified_is_refused_and_the_old_model_serves(world: dict, server: Server,
                                                                              tmp_path: Path) -> None:
    registry: Registry = world["registry"]
    serving = registry.current(CHAMPION)
    broken_dir = tmp_path / "broken-model"
    broken_dir.mkdir()
    (broken_dir / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    broken = str(registry.client.create_model_version(registry.name, source=str(broken_dir)).version)
    with pytest.raises(ModelVerificationError, match="no training run"):
        registry.promote(broken, reason="broken on purpose")
    registry.client.set_registered_model_alias(registry.name, CHAMPION, broken)  # as the MLflow UI can
    eventually(lambda: broken in httpx.get(f"{server.url}/model").json()[CHAMPION]["refused"], 20)
    state = httpx.get(f"{server.url}/model").json()[CHAMPION]
    assert state["reload_failures"] >= 1 and state["serving"]["version"] == serving
    response = httpx.post(f"{server.url}/predict", json=COURSE_RIDE)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == serving
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["ready"] and ready["fallback"] and f"version {broken} refused" in ready["problems"][0]
    assert 'tripcast_model_refused_versions{alias="champion"} 1.0' in httpx.get(f"{server.url}/metrics").text
    registry.client.set_registered_model_alias(registry.name, CHAMPION, serving)
    # Back to the version it serves: nothing is wrong any more, and /ready no longer says so.
    eventually(lambda: httpx.get(f"{server.url}/ready").json()["problems"] == [])
    assert httpx.get(f"{server.url}/ready").json()["fallback"] is None


def _with_challenger(world: dict) -> tuple[str, str]:
    """Point challenger at whichever trained version is not champion (earlier tests move the aliases)."""
    registry: Registry = world["registry"]
    champion = registry.current(CHAMPION)
    challenger = next(v for v in world["versions"] if v != champion)
    registry.client.set_registered_model_alias(registry.name, CHALLENGER, challenger)
    return champion, challenger


def test_ab_split_is_sticky_and_weighted(world: dict) -> None:
    champion, challenger = _with_challenger(world)
    srv = Server(world["env"] | {"TRIPCAST_TRAFFIC_MODE": "ab", "TRIPCAST_CHALLENGER_WEIGHT": "0.3"})
    try:
        rides = [{**COURSE_RIDE, "ride_id": f"ab-{i}"} for i in range(3000)]
        first = httpx.post(f"{srv.url}/predict/batch", json={"rides": rides}, timeout=60).json()["predictions"]
        again = httpx.post(f"{srv.url}/predict/batch", json={"rides": rides[:500]}, timeout=60).json()["predictions"]
        singles = [httpx.post(f"{srv.url}/predict", json=r).json() for r in rides[:50]]
        # The Open Inference Protocol follows the same policy; a version by number takes all the rides.
        infer = f"{srv.url}/v2/models/{world['settings'].model_name}"
        v2 = httpx.post(f"{infer}/infer", json=_v2_body(rides[:500]), timeout=60).json()["outputs"]
        pinned = httpx.post(f"{infer}/versions/{challenger}/infer", json=_v2_body(rides[:20]), timeout=60)
    finally:
        srv.stop()
    arms = [p["arm"] for p in first]
    assert next(o["data"] for o in v2 if o["name"] == "arm") == arms[:500]
    pinned_outputs = {o["name"]: o["data"] for o in pinned.json()["outputs"]}
    assert pinned.json()["model_version"] == challenger and set(pinned_outputs["arm"]) == {"challenger"}
    assert pinned_outputs["duration"] == [p["duration"] for p in first if p["arm"] == "challenger"][:1] * 20
    share = arms.count("challenger") / len(arms)
    assert abs(share - 0.3) <= 3 * np.sqrt(0.3 * 0.7 / len(arms)), share  # within 3 standard errors
    assert [p["arm"] for p in again] == arms[:500] and [p["arm"] for p in singles] == arms[:50]
    assert {p["model"]["version"] for p in first if p["arm"] == "challenger"} == {challenger}
    assert {p["model"]["version"] for p in first if p["arm"] == "champion"} == {champion}


def test_shadow_scores_the_challenger_without_changing_responses(world: dict) -> None:
    champion, challenger = _with_challenger(world)
    srv = Server(world["env"] | {"TRIPCAST_TRAFFIC_MODE": "shadow"})
    rides = world["rides"].sample(200, random_state=2)
    try:
        response = httpx.post(f"{srv.url}/predict/batch", json={"rides": _requests(rides, "shadow")}, timeout=30)
    finally:
        srv.stop()
    served = response.json()["predictions"]
    assert {p["arm"] for p in served} == {"champion"} and {p["model"]["version"] for p in served} == {champion}
    assert [p["duration"] for p in served] == world["pipelines"][champion].predict(rides).tolist()
    rows = _logged(world["settings"], "shadow", 200)
    assert len(rows) == 200 and set(rows["shadow_version"]) == {challenger}
    np.testing.assert_array_equal(rows["shadow_prediction"].to_numpy(),
                                  world["pipelines"][challenger].predict(rides))


class _Proxy:
    """A TCP forwarder to PostgreSQL that can be switched off: the store 'goes down' for real."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> None:
        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(("127.0.0.1", 5432))

                def pump(src: socket.socket, dst: socket.socket) -> None:
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        dst.close()

                threading.Thread(target=pump, args=(upstream, self.request), daemon=True).start()
                pump(self.request, upstream)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Pipe)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


@pytest.mark.postgres
def test_log_reaches_postgres_after_an_outage(world: dict, postgres_database) -> None:
    name = postgres_database().rsplit("/", 1)[1]
    proxy = _Proxy(free_port())
    proxied = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
    srv = Server(world["env"] | {"TRIPCAST_MONITORING_URI": proxied})  # the store is down from the start
    try:
        rides = [{**COURSE_RIDE, "ride_id": f"outage-{i}"} for i in range(400)]
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda r: httpx.post(f"{srv.url}/predict", json=r).status_code, rides[:100]))
        batch = httpx.post(f"{srv.url}/predict/batch", json={"rides": rides[100:]}, timeout=30)
        assert codes == [200] * 100 and batch.status_code == 200  # requests never wait for the store
        eventually(lambda: not httpx.get(f"{srv.url}/model").json()["prediction_log"]["store_up"], 10)
        log_state = httpx.get(f"{srv.url}/model").json()["prediction_log"]
        assert log_state["journal_backlog_bytes"] > 0 and log_state["written"] == 0
        # Still ready (predictions flow, into the journal), and it says what is wrong.
        ready = httpx.get(f"{srv.url}/ready")
        assert ready.status_code == 200 and not ready.json()["prediction_log"]["store_up"]
        assert ready.json()["problems"][0].startswith("monitoring store unavailable (")
        proxy.start()  # the store comes back
        rows = _logged(world["settings"], "outage", 400, timeout=30, url=f"postgresql://postgres@127.0.0.1/{name}")
        assert sorted(rows["ride_id"]) == sorted(r["ride_id"] for r in rides)
        log_state = httpx.get(f"{srv.url}/model").json()["prediction_log"]
        assert log_state["store_up"] and log_state["written"] == 400 and log_state["dropped"] == 0
        assert httpx.get(f"{srv.url}/ready").json()["problems"] == []
    finally:
        srv.stop()
        proxy.stop()


def test_openapi_documents_the_bodies_the_routes_validate(world: dict, server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, name in (("/predict", "Ride"), ("/predict/batch", "RideBatch"), ("/feedback", "LabelBatch")):
        operation = schema["paths"][path]["post"]
        documented = operation["requestBody"]["content"]["application/json"]["schema"]
        assert {"$ref": f"#/components/schemas/{name}"} in documented.get("anyOf", [documented])
        assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/HTTPValidationError"}
    assert {"HTTPValidationError", "ValidationError", "Label", "ColumnBatch", "RideColumnsBody",
            "BatchPrediction", "ColumnarBatchPrediction"} <= set(components)
    batch = schema["paths"]["/predict/batch"]["post"]
    assert batch["requestBody"]["content"]["application/json"]["schema"]["anyOf"][1] == {
        "$ref": "#/components/schemas/ColumnBatch"}
    assert set(batch["requestBody"]["content"]) == {"application/json", "application/vnd.apache.arrow.stream"}
    assert {"/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer", "/v2/health/ready",
            "/v2/models/{model}"} <= set(schema["paths"])
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert set(components["Ride"]["properties"]) == {"PULocationID", "DOLocationID", "trip_distance", "ride_id",
                                                     "pickup_datetime"}
    assert components["Ride"]["required"] == ["PULocationID", "DOLocationID", "trip_distance"]
    assert components["Ride"]["additionalProperties"] is False
    rides = components["RideBatch"]["properties"]["rides"]
    assert rides["items"] == {"$ref": "#/components/schemas/Ride"}
    assert (rides["minItems"], rides["maxItems"]) == (1, world["settings"].batch_limit)


def test_the_api_docs_render_on_an_isolated_network(server: Server, chromium: list[str]) -> None:
    # Every host but loopback unresolvable, as on a network without internet: Swagger UI must come from the API.
    offline = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1200,2000"]
    page = httpx.get(f"{server.url}/docs", timeout=10).text
    assert not re.search(r'(src|href)="https?://', page), page  # nothing fetched from elsewhere
    dom = subprocess.run(chromium + offline + ["--dump-dom", f"{server.url}/docs"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # Swagger UI ran: it read /openapi.json and drew an operation per route, /predict among them.
    assert len(re.findall(r'class="opblock opblock-', dom)) >= 8, dom[-2000:]
    assert 'data-path="/predict"' in dom and 'data-path="/predict/batch"' in dom
    redoc = subprocess.run(chromium + offline + ["--dump-dom", f"{server.url}/redoc"], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    assert "/predict/batch" in redoc and "redoc-wrap" in redoc


def test_openapi_fuzz_finds_no_server_error_and_no_departure_from_the_schema(server: Server) -> None:
    # All checks: no 5xx, and the API keeps its documented contract (schema-valid bodies accepted, invalid
    # ones refused, only documented status codes, content types and response shapes).
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(HERE / "schemathesis.toml"),
         "run", f"{server.url}/openapi.json",
         "--checks", "all", "--max-examples", "100", "-H", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]


# --- columnar batches and the Open Inference Protocol (V2) -------------------------------------------------
def _columns(body: list[dict]) -> dict[str, list]:
    return {name: [ride[name] for ride in body] for name in body[0]}


def _arrow(columns: dict) -> bytes:
    import pyarrow as pa

    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_a_batch_as_rows_as_columns_as_arrow_and_as_v2_gives_identical_answers_and_log_rows(
        world: dict, server: Server) -> None:
    import pyarrow as pa

    rides = world["rides"].sample(500, random_state=11)
    rows = _requests(rides, "form-rows")
    by_rows = httpx.post(f"{server.url}/predict/batch", json={"rides": rows}, timeout=30).json()["predictions"]
    expected = [p["duration"] for p in by_rows]
    champion = by_rows[0]["model"]["version"]  # tests before this one may have promoted another version
    assert expected == world["registry"].load_pipeline(champion)[1].predict(rides).tolist()

    columns = _columns(_requests(rides, "form-columns"))
    answer = httpx.post(f"{server.url}/predict/batch", json={"columns": columns}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"]["duration"] == expected
    assert answer.json()["predictions"]["ride_id"] == columns["ride_id"]
    assert answer.json()["models"]["champion"]["version"] == champion

    # Arrow: pickup times as Arrow timestamps (naive: New York time), the answer an Arrow stream too.
    arrow_columns = _columns(_requests(rides, "form-arrow")) | {
        "pickup_datetime": pa.array(rides["pickup_datetime"].to_numpy(), pa.timestamp("us"))}
    answer = httpx.post(f"{server.url}/predict/batch", content=_arrow(arrow_columns), timeout=30,
                        headers={"Content-Type": "application/vnd.apache.arrow.stream"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(answer.content).read_all()
    assert table.column("duration").to_pylist() == expected
    assert table.column("model_version").to_pylist() == [champion] * len(rides)

    v2 = _v2_body(_requests(rides, "form-v2"))
    answer = httpx.post(f"{server.url}/v2/models/{world['settings'].model_name}/infer", json=v2, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["duration"]["data"] == expected and outputs["duration"]["shape"] == [len(rides)]

    logged = {form: _logged(world["settings"], f"form-{form}", len(rides))
              for form in ("rows", "columns", "arrow", "v2")}
    same = ["pickup_datetime", "PULocationID", "DOLocationID", "trip_distance", "prediction", "model_version",
            "arm", "source"]
    for form, frame in logged.items():
        assert len(frame) == len(rides), form
        assert frame[same].reset_index(drop=True).equals(logged["rows"][same].reset_index(drop=True)), form


def _v2_body(rides: list[dict]) -> dict:
    types = {"PULocationID": "INT32", "DOLocationID": "INT32", "trip_distance": "FP64", "ride_id": "BYTES",
             "pickup_datetime": "BYTES"}
    return {"id": "request-1", "inputs": [{"name": name, "datatype": types[name], "shape": [len(values)],
                                           "data": values} for name, values in _columns(rides).items()]}


def test_an_independent_v2_client_gets_what_predict_gives(world: dict, server: Server) -> None:
    """tritonclient (NVIDIA's Open Inference Protocol client) against the API, unchanged: health, metadata,
    inference on the champion and on a version by number."""
    import tritonclient.http as triton

    name = world["settings"].model_name
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert {(i["name"], i["datatype"]) for i in metadata["inputs"]} >= {
        ("PULocationID", "INT32"), ("DOLocationID", "INT32"), ("trip_distance", "FP64"),
        ("pickup_datetime", "BYTES"), ("ride_id", "BYTES")}
    assert metadata["outputs"][0] == {"name": "duration", "datatype": "FP64", "shape": [-1],
                                      "parameters": {"unit": "minutes"}}

    champion = httpx.get(f"{server.url}/ready", timeout=10).json()["version"]
    rides = world["rides"].sample(40, random_state=12)
    body = _requests(rides, "triton")
    single = [httpx.post(f"{server.url}/predict", json=ride, timeout=10).json()["duration"] for ride in body]
    values = {"PULocationID": (rides["PULocationID"].to_numpy(np.int32), "INT32"),
              "DOLocationID": (rides["DOLocationID"].to_numpy(np.int32), "INT32"),
              "trip_distance": (rides["trip_distance"].to_numpy(np.float64), "FP64"),
              "pickup_datetime": (np.array([r["pickup_datetime"] for r in body], dtype=object), "BYTES")}
    inputs = []
    for input_name, (array, datatype) in values.items():
        tensor = triton.InferInput(input_name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=False)
        inputs.append(tensor)
    wanted = [triton.InferRequestedOutput("duration", binary_data=False),
              triton.InferRequestedOutput("model_version", binary_data=False)]
    for version in ("", champion):
        result = client.infer(name, inputs, model_version=version, outputs=wanted, request_id="triton-1")
        assert result.as_numpy("duration").tolist() == single
        assert result.get_response()["model_version"] == champion
        assert result.get_response()["id"] == "triton-1"
    # A registered version that is not served (no experiment runs the challenger here) is a 404 naming it.
    other = next(v for v in world["versions"] if v != champion)
    with pytest.raises(triton.InferenceServerException,
                       match=rf"version '{other}' of {name} is not served here \(serving {champion} \(champion\)\)"):
        client.infer(name, inputs, model_version=other)


@pytest.mark.parametrize(("change", "status", "words"), [
    (lambda b: b["inputs"][0].update(datatype="BYTES"), 400, "datatype BYTES is wrong for it: send INT32"),
    (lambda b: b["inputs"][2].update(datatype="BOOL", data=[True] * 3), 400, "datatype BOOL is wrong"),
    (lambda b: b["inputs"][2].update(datatype=["FP64"]), 400, "is not one of the protocol's"),
    (lambda b: b["inputs"][0].update(datatype="INT32", data=[10, 10.5, 12]), 400, "PULocationID[1]"),
    (lambda b: b["inputs"][1].update(shape=[2], data=[50, 51]), 400, "inputs differ in length"),
    (lambda b: b["inputs"][1].update(shape=[4]), 400, "shape [4] holds 4 values but data has 3"),
    (lambda b: b["inputs"].pop(2), 400, "trip_distance: Field required"),
    (lambda b: b["inputs"][0].update(data=[10, 300, 12]), 400,
     "PULocationID[1]: Input should be a taxi zone: a whole number from 1 to 265"),
    (lambda b: b["inputs"][2].update(data=[1.0, -2.0, 3.0]), 400,
     "trip_distance[1]: Input should be greater than or equal to 0"),
    (lambda b: b["inputs"].append({"name": "ride_id", "datatype": "BYTES", "shape": [3], "data": ["a", "", "c"]}),
     400, "ride_id[1]: String should have at least 1 character"),
    (lambda b: b["inputs"].append({"name": "tip", "datatype": "FP64", "shape": [3], "data": [1, 2, 3]}), 400,
     "'tip' is not an input of this model"),
    (lambda b: b.update(outputs=[{"name": "fare"}]), 400, "['fare'] are not outputs of this model"),
    (lambda b: [t.update(shape=[10_002], data=t["data"] * 3334) for t in b["inputs"]], 413,
     "a request holds at most 10,000"),
])
def test_v2_errors_are_4xx_in_the_protocol_s_words(world: dict, server: Server, change, status: int,
                                                   words: str) -> None:
    body = {"inputs": [{"name": "PULocationID", "datatype": "INT32", "shape": [3], "data": [10, 11, 12]},
                       {"name": "DOLocationID", "datatype": "INT64", "shape": [3, 1], "data": [[50], [51], [52]]},
                       {"name": "trip_distance", "datatype": "FP32", "shape": [3], "data": [1.0, 2, 3.5]}]}
    url = f"{server.url}/v2/models/{world['settings'].model_name}/infer"
    assert httpx.post(url, json=body, timeout=10).status_code == 200  # the body before the change is fine
    change(body)
    answer = httpx.post(url, json=body, timeout=30)
    assert answer.status_code == status and words in answer.json()["error"], answer.text


def test_v2_unknown_models_versions_and_bodies_are_named_4xx(world: dict, server: Server) -> None:
    name = world["settings"].model_name
    ride = {"inputs": [{"name": "PULocationID", "datatype": "INT32", "shape": [1], "data": [10]},
                       {"name": "DOLocationID", "datatype": "INT32", "shape": [1], "data": [50]},
                       {"name": "trip_distance", "datatype": "FP64", "shape": [1], "data": [4.2]}]}
    answers = {
        "model": httpx.post(f"{server.url}/v2/models/nope/infer", json=ride, timeout=10),
        "version": httpx.post(f"{server.url}/v2/models/{name}/versions/99/infer", json=ride, timeout=10),
        "metadata": httpx.get(f"{server.url}/v2/models/nope", timeout=10),
        "nan": httpx.post(f"{server.url}/v2/models/{name}/infer", timeout=10,
                          content=json.dumps(ride).replace("4.2", "NaN")),
        "binary": httpx.post(f"{server.url}/v2/models/{name}/infer", json=ride, timeout=10,
                             headers={"Inference-Header-Content-Length": "10"}),
    }
    assert {k: a.status_code for k, a in answers.items()} == {"model": 404, "version": 404, "metadata": 404,
                                                              "nan": 400, "binary": 400}
    assert "unknown model 'nope'" in answers["model"].json()["error"]
    assert f"version '99' of {name} is not served here" in answers["version"].json()["error"]
    assert "not JSON" in answers["nan"].json()["error"]
    assert "binary_data=False" in answers["binary"].json()["error"]


def test_columnar_and_arrow_errors_name_the_input_and_element_as_rows_do(server: Server) -> None:
    import pyarrow as pa

    bad_rows = [COURSE_RIDE, {**COURSE_RIDE, "PULocationID": 300}, {**COURSE_RIDE, "trip_distance": -1}]
    by_rows = httpx.post(f"{server.url}/predict/batch", json={"rides": bad_rows}, timeout=10)
    by_columns = httpx.post(f"{server.url}/predict/batch", json={"columns": _columns(bad_rows)}, timeout=10)
    assert by_rows.status_code == by_columns.status_code == 422
    assert [e["msg"] for e in by_rows.json()["detail"]] == [e["msg"] for e in by_columns.json()["detail"]]
    assert [e["loc"] for e in by_columns.json()["detail"]] == [["body", "columns", "PULocationID", 1],
                                                                ["body", "columns", "trip_distance", 2]]
    arrow = {"PULocationID": pa.array([10, None, 12]), "DOLocationID": pa.array([50, 51, 52]),
             "trip_distance": pa.array([1.0, float("nan"), 2.0])}
    answers = [httpx.post(f"{server.url}/predict/batch", content=content, timeout=10,
                          headers={"Content-Type": "application/vnd.apache.arrow.stream"})
               for content in (_arrow(arrow), b"not arrow at all")]
    assert [a.status_code for a in answers] == [422, 422]
    assert [(e["loc"][2:], e["type"]) for e in answers[0].json()["detail"]] == [
        (["PULocationID", 1], "zone_id"), (["trip_distance", 1], "finite_number")]
    assert "not an Arrow IPC stream" in answers[1].json()["detail"][0]["msg"]
