"""Decisions from sound statistics: the sequential test's error rates simulated from real ride errors, drift
alarms that know their sample sizes on real windows, and online experiments end to end (a real API with two
workers, Prefect flows, the MLflow registry): shadow and A/B, the guard after a promotion, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import eventually, module_environment

from tripcast import features as feats
from tripcast import promotion, training
from tripcast.config import Settings
from tripcast.models import TripDurationPipeline, build
from tripcast.monitoring import experiments
from tripcast.monitoring.simulation import alarms, logged, reference_of, scaled, simulate
from tripcast.registry import CHALLENGER, CHAMPION, Registry, decide
from tripcast.rehearsal import ApiClient, ApiProcess, LoopOptions, replay_rides
from tripcast.store import connect, experiment_looks, predictions

pytestmark = pytest.mark.slow
TOKEN = "experiments-token"
ALPHA = 0.05


# --- the test's error rates, from real errors --------------------------------------------------------------


def _fit(rides: pd.DataFrame) -> TripDurationPipeline:
    pre = feats.Preprocessor()
    return TripDurationPipeline("lightgbm", build("lightgbm").fit(pre.transform(rides), feats.targets(rides)), pre)


@pytest.fixture(scope="module")
def months(tlc_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    settings = Settings(home=tmp_path_factory.mktemp("months"), tlc_mirror=str(tlc_mirror), progress=False)
    return {m: training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02", "2021-03")}


@pytest.fixture(scope="module")
def residuals(months: dict) -> tuple[np.ndarray, np.ndarray]:
    """Two real models' errors on the rides of 2021-03, which neither was trained on."""
    test = months["2021-03"].rides
    actual = feats.targets(test)
    return _fit(months["2021-01"].rides).predict(test) - actual, _fit(months["2021-02"].rides).predict(test) - actual


def test_the_sequential_test_keeps_its_error_rates_when_looked_at_every_window(residuals) -> None:
    # 1,000 simulated experiments each, looked at every 2,000 labelled rides, as monitoring looks every window.
    equal, at_margin, better, worse = (scaled(*residuals, r) for r in (1.0, 0.99, 0.97, 1.03))
    shadow = {name: simulate(*errors, "shadow", experiments=1000)
              for name, errors in (("equal", equal), ("at_margin", at_margin), ("better", better), ("worse", worse))}
    assert shadow["equal"].promoted <= ALPHA and shadow["at_margin"].promoted <= ALPHA
    assert shadow["worse"].promoted <= ALPHA and shadow["worse"].rejected_worse >= 0.8
    assert shadow["better"].promoted >= 0.8 and shadow["better"].rides_to_promote <= 50_000
    # What looking every window costs a fixed-sample test: it promotes a challenger that is no better than the
    # margin far more often than its nominal 5 %.
    assert shadow["at_margin"].naive_promoted > 3 * ALPHA
    for weight in (0.5, 0.1):
        null = simulate(*equal, "ab", weight, experiments=1000, max_rides=100_000, batch=10)
        bad = simulate(*worse, "ab", weight, experiments=1000, max_rides=100_000, batch=10, seed=1)
        assert null.promoted <= ALPHA and bad.promoted <= ALPHA, (weight, null, bad)
    ab_power = simulate(*better, "ab", 0.5, experiments=200, max_rides=600_000, batch=10, seed=2)
    assert ab_power.promoted >= 0.8, ab_power


# --- drift alarms that know their sample size --------------------------------------------------------------


def test_drift_alarms_know_their_sample_sizes(months: dict, tlc_mirror: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, tlc_mirror=str(tlc_mirror), progress=False)
    champion = _fit(months["2021-01"].rides)
    reference = reference_of(champion, months["2021-02"].inputs, "1", settings)
    march = months["2021-03"].inputs
    rng = np.random.default_rng(0)
    sample_aware, fixed_only = 0, 0
    windows = 0
    for day in range(1, 29, 3):  # three-day windows of March at 30 %: ~1,500 rides each
        start = datetime(2021, 3, day)
        part = march[(march["pickup_datetime"] >= start) & (march["pickup_datetime"] < start + timedelta(days=3))]
        part = part[rng.random(len(part)) < 0.3]
        aware, fixed = alarms(logged(champion, part, "1"), reference, settings)
        windows += 1
        sample_aware += aware["data_drift"] or aware["od_drift"] or aware["prediction_drift"]
        fixed_only += fixed["data_drift"] or fixed["od_drift"] or fixed["prediction_drift"]
    assert fixed_only >= windows // 2  # sampling noise alone crossed the fixed thresholds
    assert sample_aware <= max(1, windows // 10), (sample_aware, windows)
    # A real change still alarms in its first full week: 2023's traffic against a 2021 champion.
    later = pd.read_parquet(tlc_mirror / "green_tripdata_2023-03.parquet")
    later = later.rename(columns={"lpep_pickup_datetime": "pickup_datetime", "lpep_dropoff_datetime":
                                  "dropoff_datetime"})
    week = later[(later["pickup_datetime"] >= "2023-03-06") & (later["pickup_datetime"] < "2023-03-13")]
    week = week[week["PULocationID"].between(1, 265) & week["DOLocationID"].between(1, 265)
                & week["trip_distance"].between(0, 200)].astype({"PULocationID": "int32", "DOLocationID": "int32"})
    aware, _ = alarms(logged(champion, week, "1"), reference, settings)
    assert aware["data_drift"] and aware["od_drift"]


# --- experiments end to end ---------------------------------------------------------------------------------


def _slowed(data: training.MonthData, factor: float = 1.5) -> training.MonthData:
    """The month as if every ride had taken ``factor`` times as long (a model trained on it is worse online)."""
    rides = data.rides.assign(duration=data.rides["duration"] * factor)
    rides = rides[rides["duration"] <= 60]
    return training.MonthData(data.color, data.month, data.source, data.digest, rides, data.drops, data.start,
                              data.end, data.inputs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path, months: dict,
          prefect_server: str) -> Iterator[dict]:
    """A champion (v1), two more versions (v2 trained on February, v3 trained on February slowed down), an API
    with two workers, and March's rides to replay."""
    home = tmp_path_factory.mktemp("experiments") / "home"
    with module_environment(home, tlc_mirror, TRIPCAST_POLL_SECONDS="0.5", TRIPCAST_ADMIN_TOKEN=TOKEN,
                            TRIPCAST_GUARD_DAYS="7") as (settings, env):
        yield from _world(settings, env, months, home)


def _world(settings: Settings, env: dict[str, str], months: dict, home: Path) -> Iterator[dict]:
    registry = Registry(settings)
    results = [training.train(months["2021-01"], months["2021-02"], "lightgbm", settings),
               training.train(months["2021-02"], months["2021-03"], "lightgbm", settings),
               training.train(_slowed(months["2021-02"]), _slowed(months["2021-03"]), "lightgbm", settings)]
    for result in results:
        registry.register(result.model_uri, result.run_id)
    registry.apply("1", decide(results[0].val_rmse, None, results[0].baseline_rmse, 0.01))
    registry.clear_traffic()
    api = ApiProcess(env, workers=2, output=home.parent / "api.log")
    rides = replay_rides(LoopOptions(first="2021-03", last="2021-03", sample=0.5, seed=1), settings)
    yield {"settings": settings, "registry": registry, "env": env, "api": api, "client": ApiClient(api.url, TOKEN),
           "rides": rides, "results": results, "months": months,
           "engine": connect(settings.resolved_monitoring_uri)}
    api.stop()


def _week(rides: pd.DataFrame, day: int) -> pd.DataFrame:
    start = datetime(2021, 3, day)
    return rides[(rides["pickup_datetime"] >= start) & (rides["pickup_datetime"] < start + timedelta(days=7))]


def _serve_and_label(world: dict, rides: pd.DataFrame, until: datetime) -> dict:
    """Replay rides through the API, send their labels, run the monitoring flow once: one look."""
    from tripcast.flows.monitor import monitor_flow

    client: ApiClient = world["client"]
    written = client.log_state()["written"]
    failed, versions = client.predict(rides, 1_000)
    assert failed == 0
    client.wait_logged(written + len(rides))  # this worker's; the other's are flushed within 0.1 s
    eventually(lambda: _logged_count(world, rides) >= len(rides), 30)
    client.feedback(rides)
    outcome = monitor_flow(window="week", since=(until - timedelta(days=7)).isoformat(), until=until.isoformat(),
                           automate=False)
    client.reload()
    return outcome | {"versions": versions}


def _logged_count(world: dict, rides: pd.DataFrame) -> int:
    with world["engine"].connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(predictions).where(
            predictions.c.ride_id.in_(rides["ride_id"].tolist()))).scalar_one()


def _traffic(world: dict) -> dict:
    return world["client"].client.get("/model").json()["traffic"]


def test_a_challenger_that_passes_offline_but_is_worse_online_is_rejected(world: dict) -> None:
    registry, settings, engine = world["registry"], world["settings"], world["engine"]
    slow = world["results"][2]
    # Validated on a slowed-down March, the slowed-down model passes the offline gate, as a retrain would.
    with registry.decision_lock():
        judged = promotion.judge(registry, registry.version("3"), slow, _slowed(world["months"]["2021-03"]),
                                 settings)
        assert judged.decision.promote
        started = experiments.start(engine, registry, settings, "3", "shadow", None, "passed the offline gate",
                                    datetime(2021, 3, 1))
    world["client"].reload()
    eventually(lambda: _traffic(world)["mode"] == "shadow", 10)
    rides = world["rides"]
    week = _week(rides, 1)
    outcome = _serve_and_label(world, week, datetime(2021, 3, 8))
    look = outcome["experiment"]
    assert look["decision"] == "rejected" and "worse than the champion" in look["reason"]
    # The monitoring run says what it measured (tripcast monitor prints it), not only how many rides.
    measured = outcome["windows"][0]["figures"]["1"]
    assert measured["rows"] == len(week) and measured["rmse"] > 0 and measured["rmse_ratio"] > 0
    assert {"drift_share", "prediction_drift", "od_drift"} <= set(measured)
    assert look["rides"] >= settings.experiment_min_rides and look["challenger_rmse"] > look["champion_rmse"]
    assert registry.current(CHAMPION) == "1" and registry.current(CHALLENGER) is None and registry.traffic() is None
    assert registry.version("3").tags["promotion.decision"] == "rejected"
    newest = experiments.status(engine)[0]
    assert newest["status"] == "rejected" and newest["id"] == started["id"]
    # Traffic returns to the champion alone: the shadow scoring stops.
    eventually(lambda: _traffic(world)["mode"] == "champion", 10)
    later = _week(rides, 8)
    world["client"].predict(later, 1_000)
    eventually(lambda: _logged_count(world, later) >= len(later), 30)
    with engine.connect() as conn:
        shadowed = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(
            predictions.c.ride_id.in_(later["ride_id"].tolist()), predictions.c.shadow_prediction.isnot(None))
        ).scalar_one()
    assert shadowed == 0


def test_an_ab_experiment_started_by_hand_splits_traffic_and_decides_on_the_arms(world: dict) -> None:
    registry, engine = world["registry"], world["engine"]
    env = os.environ | world["env"]
    started = subprocess.run([sys.executable, "-m", "tripcast", "experiment", "start", "2", "--mode", "ab",
                              "--weight", "0.2"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    world["client"].reload()
    eventually(lambda: _traffic(world)["mode"] == "ab", 10)
    rides = _week(world["rides"], 15)
    outcome = _serve_and_label(world, rides, datetime(2021, 3, 22))
    with engine.connect() as conn:
        arms = pd.read_sql(sa.select(predictions.c.ride_id, predictions.c.arm, predictions.c.model_version,
                                     predictions.c.prediction).where(
            predictions.c.ride_id.in_(rides["ride_id"].tolist())), conn)
    share = (arms["arm"] == "challenger").mean()
    assert abs(share - 0.2) <= 3 * np.sqrt(0.2 * 0.8 / len(arms)), share
    assert set(arms.loc[arms["arm"] == "challenger", "model_version"]) == {"2"}
    # Sticky: the same rides asked again land in the same arms.
    again = world["client"].client.post("/predict/batch", json={"rides": [
        {"PULocationID": int(r.PULocationID), "DOLocationID": int(r.DOLocationID),
         "trip_distance": float(r.trip_distance), "ride_id": r.ride_id} for r in rides.head(500).itertuples()]})
    before = dict(zip(arms["ride_id"], arms["arm"], strict=True))
    assert all(p["arm"] == before[p["ride_id"]] for p in again.json()["predictions"])
    # The look's figures are the arms' own: each arm's RMSE over its labelled rides of 1-60 minutes.
    look = outcome["experiment"]
    actual = dict(zip(rides["ride_id"], rides["actual"], strict=True))
    arms["actual"] = arms["ride_id"].map(actual)
    meant = arms[(arms["actual"] >= 1) & (arms["actual"] <= 60)]
    for arm, key in (("champion", "champion_rmse"), ("challenger", "challenger_rmse")):
        part = meant[meant["arm"] == arm]
        assert look[key] == pytest.approx(np.sqrt(np.mean((part["prediction"] - part["actual"]) ** 2)), rel=1e-6)
    assert look["rides"] == len(meant) and look["rides_challenger"] == (meant["arm"] == "challenger").sum()
    status = subprocess.run([sys.executable, "-m", "tripcast", "experiment", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    listed = next(e for e in json.loads(status.stdout) if e["id"] == look["experiment_id"])
    assert {k: listed[k] for k in ("champion_version", "challenger_version", "mode", "status")} == {
        "champion_version": "1", "challenger_version": "2", "mode": "ab",
        "status": {"continue": "running"}.get(look["decision"], look["decision"])}
    assert listed["labelled_rides"] == look["rides"] and len(listed["interval"]) == 2
    if listed["status"] == "running":
        stopped = subprocess.run([sys.executable, "-m", "tripcast", "experiment", "stop", "--reason", "test done"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and registry.traffic() is None
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(experiment_looks)).scalar_one() >= 2


@pytest.mark.parametrize(("args", "message"), [
    (["start", "99"], "has no version 99"),
    (["start", "1"], "version 1 is the champion"),
    (["start", "2", "--mode", "ab", "--weight", "1.5"], "weight 1.5: an A/B experiment needs a share"),
    (["start", "2", "--mode", "ab", "--weight", "0"], "weight 0: an A/B experiment needs a share"),
    (["start", "2", "--mode", "canary"], "mode 'canary': choose shadow or ab"),
])
def test_bad_experiment_requests_are_one_line_and_change_nothing(world: dict, args: list[str], message: str) -> None:
    registry, engine = world["registry"], world["engine"]
    before = (registry.traffic(), registry.current(CHALLENGER), experiments.status(engine))
    result = subprocess.run([sys.executable, "-m", "tripcast", "experiment", *args], env=os.environ | world["env"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert (registry.traffic(), registry.current(CHALLENGER), experiments.status(engine)) == before


def test_a_second_experiment_while_one_runs_is_refused(world: dict) -> None:
    env = os.environ | world["env"]
    first = subprocess.run([sys.executable, "-m", "tripcast", "experiment", "start", "2"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    try:
        second = subprocess.run([sys.executable, "-m", "tripcast", "experiment", "start", "3"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "is running; one at a time" in second.stderr
        assert world["registry"].current(CHALLENGER) == "2"
    finally:
        subprocess.run([sys.executable, "-m", "tripcast", "experiment", "stop"], env=env, capture_output=True,
                       timeout=120)
    assert world["registry"].traffic() is None


def test_a_bad_version_promoted_by_hand_is_rolled_back_by_the_guard(world: dict) -> None:
    registry, client = world["registry"], world["client"]
    env = os.environ | world["env"]
    promoted = subprocess.run([sys.executable, "-m", "tripcast", "models", "promote", "3", "--reason", "by hand"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    # The next monitoring run gives it a guard (the old champion in shadow); the one after sees it worse.
    rides = world["rides"]
    first = _serve_and_label(world, _week(rides, 22).head(200), datetime(2021, 3, 29))
    assert first["experiment"]["kind"] == "guard" and first["experiment"]["challenger_version"] == "1"
    eventually(lambda: _traffic(world)["mode"] == "shadow", 10)
    second = _serve_and_label(world, _week(rides, 22).iloc[200:], datetime(2021, 3, 29))
    look = second["experiment"]
    assert look["decision"] == "rolled_back", look
    assert "version 3 is worse than version 1, the champion it replaced" in look["reason"]
    assert registry.current(CHAMPION) == "1" and registry.traffic() is None
    tags = registry.version("3").tags
    assert "rollback.at" in tags and tags["experiment.decision"] == "rolled_back" and "worse" in tags["rollback.reason"]
    eventually(lambda: client.client.get("/ready").json()["version"] == "1", 20)  # serving followed
