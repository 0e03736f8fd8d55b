"""Safe to leave unattended: damaged model versions, hard kills, concurrent runs, hostile clients and bad
settings. Every fault is real: files damaged in the artifact store, SIGKILL, processes racing on a new
PostgreSQL store, raw sockets, a registry that does not answer."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import get_args
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd
import pytest
import redis
import sqlalchemy as sa
from conftest import eventually, module_environment
from test_cli import run

from tripcast import promotion, training
from tripcast.config import ConfigError, Settings, load_settings
from tripcast.errors import ModelVerificationError
from tripcast.flows.train import fresh_month
from tripcast.models import verify
from tripcast.registry import CHAMPION, Registry, decide
from tripcast.rehearsal import ApiProcess, free_port
from tripcast.store import connect, predictions

# --- settings ------------------------------------------------------------------------------------------


def _bad_values(name: str) -> list[str] | None:
    """Values outside what a setting allows, from its own declaration: below and above its bounds, not a
    number, not finite, not one of its choices. None for settings that are free text or paths."""
    if name == "retrain_model":  # a choice among the model families, checked against them
        return ["xgboost"]
    if name == "dask":  # local, local:N or a scheduler's address
        return ["yarn", "local:0", "local:x", "tcp://"]
    info = Settings.__pydantic_fields__[name]
    annotation, metadata = info.annotation, list(info.metadata)
    inner = [a for a in get_args(annotation) if a is not type(None)]
    if len(inner) == 1:
        annotation, *extra = get_args(inner[0]) or (inner[0],)
        metadata += [m for f in extra for m in getattr(f, "metadata", [f])]
    if get_args(annotation) and all(isinstance(c, str) for c in get_args(annotation)):
        return ["bogus", ""] if not inner else ["bogus"]
    if annotation is bool:
        return ["maybe", "2"]
    if annotation not in (int, float):
        return None
    values = ["not-a-number"]
    if annotation is float:
        values += ["nan", "inf", "-inf"]
    for bound in metadata:
        for attr, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            if hasattr(bound, attr):
                edge = getattr(bound, attr)
                values.append(str(edge + step if annotation is int or step else edge))
    return values


NUMERIC_OR_CHOICE = [f.name for f in fields(Settings) if _bad_values(f.name) is not None]


@pytest.mark.parametrize("name", NUMERIC_OR_CHOICE)
def test_every_numeric_and_enumerated_setting_is_checked_at_load(name: str) -> None:
    variable = "TRIPCAST_" + name.upper()
    for raw in _bad_values(name):
        with pytest.raises(ConfigError) as refused:
            load_settings(env={variable: raw})
        message = str(refused.value)
        assert message.startswith(f"{variable}={raw!r} is not allowed: it must be "), message
        assert "\n" not in message


def test_the_settings_checked_cover_every_number_and_choice() -> None:
    # What is left out is text (names, addresses, a token) and the home folder.
    unchecked = {f.name for f in fields(Settings)} - set(NUMERIC_OR_CHOICE)
    assert unchecked == {"home", "tlc_base_url", "tlc_mirror", "tracking_uri", "mlflow_experiment", "model_name",
                         "admin_token", "viewer_token", "serve_alias", "monitoring_uri", "alert_webhook_url"}


def test_a_negative_promotion_margin_is_refused_in_one_line(settings: Settings) -> None:
    # It promoted a worse model: "beats champion ... by more than -100.0 %".
    result = run(["train", "--train-month", "2021-01", "--val-month", "2021-02"],
                 {"TRIPCAST_PROMOTION_MARGIN": "-1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: TRIPCAST_PROMOTION_MARGIN='-1' is not allowed: it must be a number ≥ 0 and < 1"]
    assert not (settings.home / "data").exists()


# --- a registry that does not answer -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_an_unreachable_registry_is_one_line_before_any_data_is_loaded(settings: Settings, scheme: str) -> None:
    port = free_port()  # nothing listens there: a server that is down
    address = (f"http://127.0.0.1:{port}" if scheme == "http"
               else f"postgresql://postgres:secret@127.0.0.1:{port}/mlflow")
    started = time.monotonic()
    result = run(["train", "--train-month", "2021-01", "--val-month", "2021-02"],
                 {"TRIPCAST_TRACKING_URI": address, "TRIPCAST_REGISTRY_WAIT_SECONDS": "2"})
    seconds = time.monotonic() - started
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the registry at ")
    assert f"127.0.0.1:{port}" in lines[0] and "does not answer after 2 s" in lines[0]
    assert "secret" not in lines[0]  # the password is not printed
    assert seconds < 20 and not (settings.home / "data").exists()  # seconds, not minutes; no data loaded


# --- model versions: verified before they are used ------------------------------------------------------


def _pipeline_file(registry: Registry, version: str, name: str = "lightgbm.txt") -> Path:
    mv = registry.version(version)
    model = registry.client.get_logged_model(mv.source.removeprefix("models:/"))
    return Path(urlparse(model.artifact_location).path) / "artifacts" / verify.PIPELINE_ARTIFACT / name


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = random.Random(7).randbytes(4096)
    path.write_bytes(bytes(data))


def _alter(path: Path) -> None:
    """A digit of one leaf's value changed in place: the file keeps its format and size (its header lists each
    tree's length in bytes), and says something else."""
    data = bytearray(path.read_bytes())
    digit = data.index(b".", data.index(b"leaf_value=")) + 1
    data[digit] = ord("0") + (data[digit] - ord("0") + 5) % 10
    path.write_bytes(bytes(data))


DAMAGES = {
    "garbled": _garble,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 3]),
    "altered": _alter,
    "missing": lambda path: path.unlink(),
}


def _forge_digests(registry: Registry, version: str) -> None:
    """Record the damaged file's digest as if training had logged it: only the load in a separate process
    and the recorded predictions are left to catch it."""
    mv = registry.version(version)
    recorded = json.loads(registry.client.get_run(mv.run_id).data.tags[verify.DIGESTS_TAG])
    recorded["pipeline/lightgbm.txt"] = verify.sha256(_pipeline_file(registry, version))
    registry.client.set_tag(mv.run_id, verify.DIGESTS_TAG, json.dumps(recorded))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path) -> Iterator[dict]:
    """A registry whose champion (v1) is sound, and spare versions to damage, one per test."""
    home = tmp_path_factory.mktemp("unattended") / "home"
    with module_environment(home, tlc_mirror, TRIPCAST_ADMIN_TOKEN="t") as (settings, env):
        yield _world(settings, env)


def _world(settings: Settings, env: dict[str, str]) -> dict:
    months = {m: training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02")}
    registry = Registry(settings)
    results = []
    for trees in range(60, 70):  # as many trees as the default: such a file, garbled, aborts LightGBM
        result = training.train(months["2021-01"], months["2021-02"], "lightgbm", settings,
                                params={"n_estimators": trees})
        results.append(result)
        registry.register(result.model_uri, result.run_id)
    registry.apply("1", decide(results[0].val_rmse, None, results[0].baseline_rmse, 0.01))
    spares = iter(str(v) for v in range(2, len(results) + 1))
    return {"settings": settings, "env": env, "registry": registry, "months": months, "results": results,
            "spare": lambda: next(spares)}


@pytest.fixture(scope="module")
def api(world: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    log = tmp_path_factory.mktemp("api") / "api.log"
    server = ApiProcess(world["env"], output=log)
    yield server
    server.stop()


def _point_champion_at(registry: Registry, version: str) -> None:
    # As an operator in the MLflow UI would, or automation gone wrong: `tripcast models promote` refuses it.
    registry.client.set_registered_model_alias(registry.name, CHAMPION, version)


def _served(api: ApiProcess) -> str:
    response = httpx.post(f"{api.url}/predict", json={"PULocationID": 74, "DOLocationID": 75, "trip_distance": 1.2})
    assert response.status_code == 200
    return response.headers["X-Model-Version"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*DAMAGES, "garbled, digests forged", "altered, digests forged"])
def test_a_damaged_champion_never_stops_the_api(world: dict, api: ApiProcess, kind: str) -> None:
    registry: Registry = world["registry"]
    version = world["spare"]()
    DAMAGES[kind.split(",")[0]](_pipeline_file(registry, version))
    if "forged" in kind:
        _forge_digests(registry, version)
    _point_champion_at(registry, version)
    try:
        eventually(lambda: version in httpx.get(f"{api.url}/ready").json()["refused"], 60)
        time.sleep(1.5)  # five more polls: a refused version is not tried again
        ready = httpx.get(f"{api.url}/ready")
        body = ready.json()
        assert ready.status_code == 200 and body["version"] == "1" and _served(api) == "1"
        assert api.process.poll() is None  # alive: no crash, no restart
        reason = body["refused"][version]
        expected = {"garbled": "pipeline/lightgbm.txt is not the file training logged",
                    "truncated": "pipeline/lightgbm.txt is not the file training logged",
                    "altered": "pipeline/lightgbm.txt is not the file training logged",
                    "missing": "pipeline/lightgbm.txt is missing",
                    "garbled, digests forged": "crashed a checking process (SIG",
                    "altered, digests forged": "reference rides differently from training"}[kind]
        assert expected in reason and reason.startswith(f"{registry.name} version {version} failed verification")
        assert any(f"version {version} refused" in p for p in body["problems"])
        assert body["fallback"] == f"version {version} (behind 'champion') was refused; still serving version 1"
        metrics = httpx.get(f"{api.url}/metrics").text
        assert re.search(r'tripcast_model_refused_versions\{alias="champion"\} [1-9]', metrics)
        said = api.output.read_text()
        assert said.count(f"version {version} refused") == 1 and "Traceback" not in said
    finally:
        _point_champion_at(registry, "1")
    eventually(lambda: httpx.get(f"{api.url}/ready").json()["fallback"] is None, 10)


@pytest.mark.slow
def test_an_api_restarted_on_a_damaged_champion_serves_the_last_good_one(world: dict, tmp_path: Path) -> None:
    registry: Registry = world["registry"]
    version = world["spare"]()
    _garble(_pipeline_file(registry, version))
    _forge_digests(registry, version)  # the worst case: only the separate process stands between it and a crash
    registry.client.set_registered_model_tag(registry.name, "champion_history", json.dumps(["1", version]))
    _point_champion_at(registry, version)
    try:
        for restart in range(2):  # a crash loop would start here; it must not
            server = ApiProcess(world["env"], output=tmp_path / f"api-{restart}.log")
            try:
                body = httpx.get(f"{server.url}/ready").json()
                assert body["ready"] and body["version"] == "1" and _served(server) == "1"
                assert body["fallback"] == (f"version {version} (behind 'champion') was refused; serving version 1, "
                                            "the last champion before it that passes verification")
            finally:
                server.stop()
        assert "serving version 1, the last champion before it" in (tmp_path / "api-1.log").read_text()
        # The stream consumer too: it predicts with version 1, where it would have crashed on the champion.
        stream_name = f"unattended-{os.getpid()}"
        redis_client = redis.Redis()
        consumer = subprocess.Popen([sys.executable, "-m", "tripcast", "stream", "--input", f"{stream_name}:in",
                                     "--output", f"{stream_name}:out", "--dead-letter", f"{stream_name}:dead",
                                     "--group", stream_name], env=os.environ | world["env"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            redis_client.xadd(f"{stream_name}:in", {"ride": json.dumps(
                {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 1.2, "ride_id": "stream-1"})})
            eventually(lambda: redis_client.xlen(f"{stream_name}:out") == 1, 60)
            assert redis_client.xrange(f"{stream_name}:out")[0][1][b"model_version"] == b"1"
        finally:
            consumer.send_signal(signal.SIGTERM)
            said = consumer.communicate(timeout=30)[1]
            redis_client.delete(*(f"{stream_name}:{k}" for k in ("in", "out", "dead")))
        assert consumer.returncode == 0 and "Traceback" not in said and f"version {version} refused" in said
        # Batch scoring refuses it in one line, and the registry will not promote it.
        result = run(["score", "--month", "2021-02"])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"version {version} failed verification" in result.stderr.strip().splitlines()[-1]
        with pytest.raises(ModelVerificationError, match=f"version {version} failed verification"):
            registry.promote(version)
    finally:
        _point_champion_at(registry, "1")
        registry.client.set_registered_model_tag(registry.name, "champion_history", json.dumps(["1"]))


@pytest.mark.slow
def test_automation_never_promotes_a_damaged_version_and_replaces_a_damaged_champion(world: dict) -> None:
    registry: Registry = world["registry"]
    months, settings = world["months"], world["settings"]
    damaged = world["spare"]()
    result = world["results"][int(damaged) - 1]
    DAMAGES["truncated"](_pipeline_file(registry, damaged))
    judged = promotion.judge(registry, registry.version(damaged), result, months["2021-02"], settings)
    assert not judged.decision.promote and "failed verification" in judged.decision.reason

    # A good challenger against a champion that fails verification: the champion is replaced, not kept.
    sound = world["spare"]()
    _point_champion_at(registry, damaged)
    try:
        result = world["results"][int(sound) - 1]
        judged = promotion.judge(registry, registry.version(sound), result, months["2021-02"], settings)
        assert judged.decision.promote and judged.decision.reason.startswith(
            f"the champion cannot be used ({registry.name} version {damaged} failed verification")
    finally:
        _point_champion_at(registry, "1")


# --- the comparison is out of sample ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_champion_is_compared_on_rides_it_was_not_trained_on(world: dict, tmp_path: Path) -> None:
    base = world["settings"]
    settings = base.with_overrides(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", home=tmp_path / "home")
    registry = Registry(settings)
    months = {m: training.read_month_data("green", m, base) for m in ("2021-01", "2021-02", "2021-03")}

    def champion_trained_on(data: training.MonthData, validation: training.MonthData) -> str:
        result = training.train(data, validation, "lightgbm", settings)
        version = str(registry.register(result.model_uri, result.run_id).version)
        registry.apply(version, decide(result.val_rmse, None, result.baseline_rmse, 0.01))
        return version

    challenger = training.train(months["2021-01"], months["2021-02"], "lightgbm", settings)
    version = registry.register(challenger.model_uri, challenger.run_id)

    # The champion was trained on February, the month the challenger is validated on: they meet on March.
    february = champion_trained_on(months["2021-02"], months["2021-03"])
    _, champion = registry.load_pipeline(february)
    march = months["2021-03"].rides
    judged = promotion.judge(registry, version, challenger, months["2021-02"], settings,
                             fresh=fresh_month("green", months["2021-02"].month, base))
    assert judged.compared_on == "green 2021-03, which neither model was trained on" and judged.rows == len(march)
    reason = judged.decision.reason
    assert reason.startswith(f"the champion (version {february}) was trained on the rides this version is validated on")
    march_rmse = float(np.sqrt(np.mean((champion.predict(march) - march["duration"]) ** 2)))
    assert judged.champion_rmse == pytest.approx(march_rmse)
    february_rides = months["2021-02"].rides  # in sample, it looks better than it is
    in_sample = float(np.sqrt(np.mean((champion.predict(february_rides) - february_rides["duration"]) ** 2)))
    assert in_sample < march_rmse

    # Trained on the first half of February: compared on the validation rides of the second half only.
    half = months["2021-02"].rides
    half = half[half["pickup_datetime"] < pd.Timestamp("2021-02-15")]
    first_half = training.prepare_period(half, pd.Timestamp("2021-02-01").to_pydatetime(),
                                         pd.Timestamp("2021-02-15").to_pydatetime(), "test", settings)
    halfway = champion_trained_on(first_half, months["2021-03"])
    judged = promotion.judge(registry, version, challenger, months["2021-02"], settings)
    later = int((months["2021-02"].rides["pickup_datetime"] >= pd.Timestamp("2021-02-15")).sum())
    assert judged.rows == later and judged.champion_version == halfway
    assert judged.decision.reason.startswith(f"on the {later:,} validation rides outside the champion's training")

    # No fresh window at hand: not promoted, and it says why.
    champion_trained_on(months["2021-02"], months["2021-03"])
    judged = promotion.judge(registry, version, challenger, months["2021-02"], settings, fresh=lambda periods: None)
    assert not judged.decision.promote and "no fresh window is at hand" in judged.decision.reason


# --- concurrent runs ------------------------------------------------------------------------------------

# Three identical runs reach their decision together (the race); in whatever order the four decide, the policy
# promotes at most one of the three (the others do not beat it by the margin) and ends on the last, trained on
# February and better on March, which is where it meets a champion trained on January.
RUNS = [("lightgbm", "2021-01", "2021-02")] * 3 + [("lightgbm", "2021-02", "2021-03")]


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_trainings_on_a_new_postgres_store_decide_one_at_a_time(tmp_path: Path, tlc_mirror: Path,
                                                                           postgres_database) -> None:
    for repetition in range(3):
        uri, home = postgres_database(), tmp_path / f"home-{repetition}"  # new stores, Prefect's home shared
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIPCAST_", "PREFECT_"))} | {
            "TRIPCAST_HOME": str(home), "TRIPCAST_TRACKING_URI": uri, "TRIPCAST_TLC_MIRROR": str(tlc_mirror),
            "TRIPCAST_PROGRESS": "false", "TRIPCAST_CONFIG": str(tmp_path / "absent.toml")}
        runs = [subprocess.Popen([sys.executable, "-m", "tripcast", "train", "--model", model, "--train-month", train,
                                  "--val-month", val, "--json"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for model, train, val in RUNS]
        done = [r.communicate(timeout=600) for r in runs]
        assert [r.returncode for r in runs] == [0] * 4, [err[-2000:] for _, err in done]
        assert not any("Traceback" in err or "rror" in err for _, err in done), [err[-2000:] for _, err in done]
        results = [json.loads(out) for out, _ in done]
        registry = Registry(Settings(home=home, tracking_uri=uri, tlc_mirror=str(tlc_mirror), progress=False))
        history = registry.history()
        promoted = [r["version"] for r in results if r["promoted"]]
        assert len(history) == len(set(history)) and sorted(history) == sorted(promoted)  # each promotion once
        assert registry.current(CHAMPION) == results[3]["version"] == history[-1]
        for before, version in zip([None, *history], history, strict=False):
            tags = registry.version(version).tags
            assert tags.get("promotion.previous_champion") == before
            assert tags["promotion.reason"].startswith("no champion yet") == (before is None)
        assert sum(r["promoted"] for r in results[:3]) <= 1


@pytest.mark.slow
def test_a_run_re_run_after_a_crash_registers_nothing_twice(settings: Settings) -> None:
    """What Prefect's crash recovery does to a deployment's run (flows/recovery.py): the same flow run again.
    Here the run's id is given as Prefect's runtime override, so that two processes are two attempts of it."""
    from tripcast.registry import FLOW_RUN_TAG

    run_id = "5d0f5c1e-8d6c-4bb6-9c55-3d1c0a6f0001"
    attempt = {"PREFECT__RUNTIME__FLOW_RUN__ROOT_FLOW_RUN_ID": run_id}
    args = ["train", "--train-month", "2021-01", "--val-month", "2021-02", "--json"]
    first = run(args, attempt)
    assert first.returncode == 0, first.stderr
    registry = Registry(settings)
    assert [v.tags[FLOW_RUN_TAG] for v in registry.versions()] == [f"{run_id}/0"]

    # The attempt got as far as its decision: a re-run reports it, and neither registers nor decides again.
    again = run(args, attempt)
    assert again.returncode == 0, again.stderr
    assert [str(v.version) for v in registry.versions()] == ["1"]
    assert json.loads(again.stdout)["version"] == json.loads(first.stdout)["version"] == "1"
    assert json.loads(again.stdout)["promoted"] is True and registry.history() == ["1"]

    # An attempt that died between registering and deciding (SIGKILL: no handler ran): the re-run decides that
    # version instead of registering another.
    other = "5d0f5c1e-8d6c-4bb6-9c55-3d1c0a6f0002"
    first_version = registry.version("1")
    orphan = registry.register(first_version.source, first_version.run_id, tags={FLOW_RUN_TAG: f"{other}/0"})
    resumed = run(args, {"PREFECT__RUNTIME__FLOW_RUN__ROOT_FLOW_RUN_ID": other})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["version"] == str(orphan.version) == "2"
    assert [str(v.version) for v in registry.versions()] == ["1", "2"]
    assert registry.version("2").tags["promotion.decision"] == "rejected"  # the same model: no gain over v1
    assert registry.current(CHAMPION) == "1"


# --- answered means durable -----------------------------------------------------------------------------


def _load(url: str, prefix: str, stop: threading.Event, answered: list[str]) -> None:
    """One client: rides one at a time and in batches of 200, keeping the ride_ids of every 200 answer."""
    n = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            n += 1
            try:
                if n % 20 == 0:
                    ids = [f"{prefix}-{n}-{k}" for k in range(200)]
                    response = client.post("/predict/batch", json={"rides": [
                        {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 1.5, "ride_id": i} for i in ids]})
                else:
                    ids = [f"{prefix}-{n}"]
                    response = client.post("/predict", json={"PULocationID": 74, "DOLocationID": 75,
                                                             "trip_distance": 1.5, "ride_id": ids[0]})
            except httpx.TransportError:
                continue  # the server is gone (or restarting): not answered
            if response.status_code == 200:
                answered.extend(ids)


def _logged_ids(url: str) -> pd.Series:
    engine = connect(url)
    with engine.connect() as conn:
        ids = pd.read_sql(sa.select(predictions.c.ride_id), conn)["ride_id"]
    engine.dispose()
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_under_load_loses_no_answered_prediction(world: dict, tmp_path: Path, workers: int) -> None:
    store = f"sqlite:///{tmp_path / 'monitoring.db'}"
    env = world["env"] | {"TRIPCAST_MONITORING_URI": store, "TRIPCAST_LOG_FLUSH_SECONDS": "0.5"}
    server = ApiProcess(env, output=tmp_path / "api.log", workers=workers)
    answered: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(server.url, f"c{i}", stop, answered)) for i in range(6)]
    for client in clients:
        client.start()
    try:
        time.sleep(4)
        if workers == 1:
            server.process.send_signal(signal.SIGKILL)  # the whole server, under load
            server.process.wait()
        else:  # one of two workers: uvicorn starts another; its journal is replayed by a live process
            child = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True)
            victim = max(int(pid) for pid in child.stdout.split())
            os.kill(victim, signal.SIGKILL)
        time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join()
    killed_with = len(_logged_ids(store)) if (tmp_path / "monitoring.db").exists() else 0
    if workers == 1:
        server = ApiProcess(env, output=tmp_path / "api-restarted.log")  # starts and replays what was left
    try:
        eventually(lambda: set(answered) <= set(_logged_ids(store)), 60)
        logged = _logged_ids(store)
        assert logged.is_unique and len(answered) > 2000 and killed_with < len(answered)
        print(f"\n{workers} worker(s): {len(answered):,} answered, {killed_with:,} in the store when killed, "
              f"{len(logged):,} logged after the restart")
    finally:
        server.stop()


# --- hostile clients -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_api(world: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    env = world["env"] | {"TRIPCAST_HTTP_HEADER_TIMEOUT_SECONDS": "1", "TRIPCAST_HTTP_BODY_TIMEOUT_SECONDS": "1",
                          "TRIPCAST_HTTP_MAX_HEADER_BYTES": "4096"}
    server = ApiProcess(env, output=tmp_path_factory.mktemp("strict") / "api.log")
    yield server
    server.stop()


def _raw(api: ApiProcess, data: bytes, wait: float = 5) -> tuple[bytes, float]:
    """Send bytes on a new connection; return what came back before the server closed it, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", api.port), timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received, time.monotonic() - started


def _count(api: ApiProcess, path: str, status: int) -> float:
    pattern = rf'tripcast_requests_total\{{path="{re.escape(path)}",status="{status}"\}} (\S+)'
    match = re.search(pattern, httpx.get(f"{api.url}/metrics").text)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_a_client_that_disconnects_mid_upload_is_not_a_server_error(strict_api: ApiProcess) -> None:
    with socket.create_connection(("127.0.0.1", strict_api.port)) as conn:
        conn.sendall(b"POST /predict/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000\r\n\r\n" + b'{"rides": [' + b" " * 5000)
        time.sleep(0.3)
    eventually(lambda: _count(strict_api, "/predict/batch", 499) >= 1, 5)
    assert _count(strict_api, "/predict/batch", 500) == 0
    assert "Traceback" not in strict_api.output.read_text() and "Exception" not in strict_api.output.read_text()


@pytest.mark.slow
def test_path_inputs_are_checked_before_the_file_system(strict_api: ApiProcess) -> None:
    for name in ("%00.html", "a" * 400 + ".html", "..%2F..%2Fetc%2Fpasswd", ".hidden.html", "x%0a.html"):
        response = httpx.get(f"{strict_api.url}/dashboard/reports/{name}")
        assert response.status_code == 404, name


@pytest.mark.slow
def test_headers_are_bounded_in_size_and_time_and_bodies_in_time(strict_api: ApiProcess) -> None:
    big = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n"
    answer, _ = _raw(strict_api, big)
    assert answer.startswith(b"HTTP/1.1 431 ")
    endless = b"GET /health HTTP/1.1\r\nhost: x\r\nx-endless: " + b"a" * 6000  # never ends
    answer, _ = _raw(strict_api, endless)
    assert answer.startswith(b"HTTP/1.1 431 ")
    answer, seconds = _raw(strict_api, b"GET /health HTTP/1.1\r\nhost: x\r\n")  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408 ") and seconds < 4
    _, seconds = _raw(strict_api, b"")  # connected, silent
    assert seconds < 4
    before = _count(strict_api, "/predict/batch", 408)
    answer, seconds = _raw(strict_api, b"POST /predict/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408 ") and seconds < 4
    eventually(lambda: _count(strict_api, "/predict/batch", 408) == before + 1, 5)
    assert httpx.get(f"{strict_api.url}/health").status_code == 200  # and it serves everyone else meanwhile


HALFWAY_APP = """
import asyncio, sys

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/upload":
        while (await receive()).get("more_body"):
            pass
    head = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
    if scope["path"] == "/stream":
        await send(head)
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"second"})
        return
    await send({**head, "headers": head["headers"] + [(b"content-length", b"2")]})
    if scope["path"] == "/halfway":
        print("head sent", flush=True)
        await asyncio.sleep(60)
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else b"ok"})
"""


def test_a_replica_killed_between_an_answers_head_and_body_sent_nothing_of_it(tmp_path: Path) -> None:
    """uvicorn writes a head, then a body: killed in between, a replica sent nginx a head it then had to cut,
    too late to retry elsewhere. tripcast's protocol sends the head with the body."""
    (tmp_path / "halfway.py").write_text(HALFWAY_APP)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", f"import uvicorn; uvicorn.run('halfway:app', port={port}, lifespan='off', "
         "log_level='warning', http='tripcast.serving.http:BoundedHttpToolsProtocol')"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        eventually(lambda: socket.create_connection(("127.0.0.1", port)).close() is None, 30, ignoring=(OSError,))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            # A body-less answer (HEAD) and a 100 Continue still leave, and a stream's chunks as they come.
            conn.sendall(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            conn.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
            assert conn.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            conn.sendall(b"{}")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            conn.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            first = conn.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"5\r\nfirst\r\n"), first
            assert conn.recv(65536) == b"6\r\nsecond\r\n0\r\n\r\n"

            conn.sendall(b"GET /halfway HTTP/1.1\r\nhost: x\r\n\r\n")
            assert server.stdout.readline() == "head sent\n"
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(65536)  # the head waits for its body
            server.kill()
            conn.settimeout(5)
            assert conn.recv(65536) == b""  # closed with nothing of the answer sent: nginx may retry it
    finally:
        server.kill()
        server.wait()


def test_fuzzed_settings_values_never_escape_as_tracebacks() -> None:
    rng = random.Random(3)
    names = [f.name for f in fields(Settings)]
    for _ in range(300):
        name = rng.choice(names)
        raw = rng.choice(["", "-0", "1e309", "0x10", " 5 ", "true", "∞", "9" * 30, str(rng.uniform(-1e6, 1e6)),
                          str(math.pi), "None", "[1]"])
        try:
            load_settings(env={"TRIPCAST_" + name.upper(): raw})
        except ConfigError as exc:
            assert "\n" not in str(exc) and ("TRIPCAST_" + name.upper()) in str(exc) or "settings:" in str(exc)
