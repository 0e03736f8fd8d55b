"""End to end, with every part real: the API in its own process (two workers), Prefect flows, the MLflow
registry, and the monitoring store on PostgreSQL (production profile) or SQLite. Real months are replayed over
HTTP with a drift injected; labels arrive a window later; monitoring alerts; the policy retrains; the
challenger that passes the offline gate is tried in shadow, promoted on the online evidence, guarded; the API
follows the registry throughout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tripcast.config import Settings
from tripcast.monitoring.windows import compute_window, window_ending, window_of
from tripcast.registry import CHAMPION, Registry
from tripcast.rehearsal import ApiProcess, LoopOptions, run_loop, timeline_rows
from tripcast.store import connect, decisions, experiments, predictions

pytestmark = pytest.mark.slow
SAVE_SCREENSHOT = os.environ.get("TRIPCAST_SAVE_SCREENSHOT")  # read before the tests reset TRIPCAST_*
OPTIONS = dict(color="green", first="2021-01", last="2021-03", sample=0.35, drift="slower-traffic",
               drift_from="2021-02", seed=3, workers=2)


def _rehearse(home: Path, mirror: Path, extra: dict[str, str]) -> tuple[Settings, object, dict[str, str]]:
    """Train the champion on 2021-01 (validated on 2021-02), then replay 2021-01..03, slower from February."""
    from tripcast.flows.train import train_flow

    env = {"TRIPCAST_HOME": str(home), "TRIPCAST_TLC_MIRROR": str(mirror), "TRIPCAST_PROGRESS": "false",
           "TRIPCAST_CONFIG": str(home / "absent.toml"), "TRIPCAST_RETRAIN_MIN_ROWS": "2000"} | extra
    for key in [k for k in os.environ if k.startswith("TRIPCAST_")]:
        del os.environ[key]
    os.environ.update(env)
    settings = Settings(home=home, tlc_mirror=str(mirror), progress=False, retrain_min_rows=2000,
                        monitoring_uri=extra.get("TRIPCAST_MONITORING_URI"),
                        retrain_model=extra.get("TRIPCAST_RETRAIN_MODEL", "lightgbm"))
    train_flow("green", "2021-01", "2021-02", "lightgbm")
    return settings, run_loop(LoopOptions(**OPTIONS), settings), env


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def promoted(request, tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path, prefect_server: str,
             postgres_database) -> Iterator[tuple[Settings, object, dict[str, str]]]:
    saved = dict(os.environ)
    home = tmp_path_factory.mktemp(f"loop-promoted-{request.param}") / "home"
    store = {"TRIPCAST_MONITORING_URI": postgres_database()} if request.param == "postgresql" else {}
    yield _rehearse(home, tlc_mirror, store)
    os.environ.clear()
    os.environ.update(saved)


def test_drift_retrains_tries_the_challenger_in_shadow_promotes_it_and_the_api_follows(promoted) -> None:
    settings, result, _ = promoted
    registry = Registry(settings)
    assert result.failed == 0 and result.sent > 60_000
    engine = connect(settings.resolved_monitoring_uri)
    with engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one()
        stored = conn.execute(sa.select(decisions).order_by(decisions.c.id)).mappings().all()
        tried = conn.execute(sa.select(experiments)).mappings().all()
    assert logged == result.sent  # every prediction of the replay is in the log

    # The first accuracy alert has no labelled rides since the change yet: deferred. The next one retrains on
    # the first drifted week and evaluates on the second; version 2 passes the offline gate, and a shadow
    # experiment decides: it is promoted on the online evidence alone, and a guard follows.
    actions = [(d["action"], d["challenger_version"]) for d in stored]
    assert ("skipped", None) in actions and ("experiment", "2") in actions and ("promoted", "2") in actions
    assert actions.index(("experiment", "2")) < actions.index(("promoted", "2"))
    started = next(d for d in stored if d["action"] == "experiment")
    assert "accuracy" in started["trigger"] and json.loads(started["data"])["train_start"] == "2021-02-01T00:00:00"
    promotion = next(d for d in stored if d["action"] == "promoted")
    assert "with 95% confidence" in promotion["reason"] and "labelled rides" in promotion["reason"]
    experiment = next(e for e in tried if e["kind"] == "experiment")
    assert (experiment["mode"], experiment["status"], experiment["challenger_version"]) == ("shadow", "promoted", "2")
    guard = next(e for e in tried if e["kind"] == "guard")
    assert (guard["champion_version"], guard["challenger_version"]) == ("2", "1")
    version = registry.version("2")
    assert version.tags["promotion.decision"] == "promoted" and version.tags["experiment.decision"] == "promoted"
    assert "accuracy" in version.tags["automation.trigger"]

    # Serving followed: the challenger was only shadowed (never answered) until promoted, then it answered.
    rows = timeline_rows(result)
    in_shadow = [r["window"] for r in rows if "shadow v2" in r["experiment"]]
    assert in_shadow and all(r["served"] == "v1" for r in rows if r["window"] <= in_shadow[0])
    assert rows[-1]["served"] == "v2" and any("guard v1" in r["experiment"] for r in rows)
    assert guard["status"] == "passed" and ("passed", "1") in actions  # v2 held against v1 for the guard's week
    drifted = [r for r in rows if r["window"] >= "2021-02-01"]
    assert drifted[0]["rmse_ratio"] >= 1 + settings.rmse_increase  # the slowdown shows once labels arrive
    assert all(r["rmse_ratio"] < 1 + settings.rmse_increase for r in rows if "2021-01-04" <= r["window"] < "2021-02")
    assert rows[-1]["rmse_ratio"] < 1 + settings.rmse_increase  # the promoted model is back in range


def test_every_event_is_dated_by_the_window_it_followed(promoted) -> None:
    """Alerts name the window they are about; decisions and looks, the window after which monitoring made
    them; the timeline's rows file decisions under that window; reasons name windows in order."""
    settings, result, _ = promoted
    rows = {r["window"]: r for r in timeline_rows(result)}
    for alert in result.timeline["alerts"]:
        assert f"(week {alert['window_start'][:10]}, model version" in alert["message"], alert["message"]
    for decision in result.timeline["decisions"]:
        window = window_ending(settings.window, datetime.fromisoformat(decision["event_time"]))
        assert decision["window"] == str(window) and decision["action"] in rows[f"{window.start:%Y-%m-%d}"]["decisions"]
        named = re.findall(r"week (\d{4}-\d\d-\d\d)", decision["reason"])
        if decision["reason"].startswith("deferred: the change began"):  # in or after the newest labelled week
            assert named[0] > named[1] if len(named) == 2 else "the newest labelled week" in decision["reason"]
        elif decision["reason"].startswith("deferred: "):
            assert named == [] or named[0] < named[1], decision["reason"]
    promotion = next(d for d in result.timeline["decisions"] if d["action"] == "promoted")
    after = [r for r in timeline_rows(result) if r["window"] > promotion["window"].split()[-1]]
    assert rows[promotion["window"].split()[-1]]["served"] == "v1" and after[0]["served"] == "v2"


def test_a_worse_challenger_is_rejected_and_the_champion_stays(tmp_path: Path, tlc_mirror: Path,
                                                               prefect_server: str) -> None:
    saved = dict(os.environ)
    try:
        # The rule baseline as the retrained family: it cannot beat the rule baseline, so it must be rejected.
        settings, result, _ = _rehearse(tmp_path / "home", tlc_mirror, {"TRIPCAST_RETRAIN_MODEL": "baseline"})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    registry = Registry(settings)
    with connect(settings.resolved_monitoring_uri).connect() as conn:
        stored = conn.execute(sa.select(decisions).order_by(decisions.c.id)).mappings().all()
    rejected = [d for d in stored if d["action"] == "rejected"]
    assert rejected and all("does not beat the rule baseline" in d["reason"] for d in rejected)
    assert not [d for d in stored if d["action"] == "promoted"]
    assert registry.current(CHAMPION) == "1" and registry.history() == ["1"]
    assert registry.version(rejected[0]["challenger_version"]).tags["promotion.decision"] == "rejected"
    assert result.failed == 0 and set().union(*result.served.values()) == {"1"}


def _logged(engine: sa.engine.Engine, ride_id: str, timeout: float = 30) -> datetime:
    """The pickup time of a ride once the API's prediction log has written it to the store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            found = conn.execute(sa.select(predictions.c.pickup_datetime)
                                 .where(predictions.c.ride_id == ride_id)).scalar()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"ride {ride_id} not in the prediction log after {timeout:.0f} s")


@pytest.mark.parametrize("promoted", ["postgresql"], indirect=True)
def test_dashboard_renders_in_headless_chromium(promoted, tmp_path: Path, chromium: list[str]) -> None:
    settings, result, env = promoted
    env = env | {"TRIPCAST_ADMIN_TOKEN": "dashboard-test"}
    api = ApiProcess(env)
    try:
        # A live ride among the replayed ones (the README's example without its pickup time), measured in its
        # own week: the dashboard still opens on the replay and marks that week as too small.
        live = {"ride_id": "live", "PULocationID": 10, "DOLocationID": 50, "trip_distance": 40}
        assert httpx.post(f"{api.url}/predict", json=live, timeout=10).status_code == 200
        engine = connect(settings.resolved_monitoring_uri)
        stray = _logged(engine, "live")
        compute_window(engine, Registry(settings), window_of(settings.window, stray), settings)
        data = httpx.get(f"{api.url}/dashboard/data", timeout=30).json()
        flags = chromium + ["--window-size=1400,1700"]
        shot = tmp_path / "dashboard.png"
        subprocess.run(flags + [f"--screenshot={shot}", f"{api.url}/dashboard"], check=True, capture_output=True,
                       timeout=120)
        dom = subprocess.run(flags + ["--dump-dom", f"{api.url}/dashboard"], check=True, capture_output=True,
                             text=True, timeout=120).stdout
        metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
        newest = f"{api.url}/dashboard/reports/{[w['report'] for w in data['windows'] if w['report']][-1]}"
        report = httpx.get(newest, timeout=30)
        drawn = subprocess.run(flags + ["--dump-dom", newest], check=True, capture_output=True, text=True,
                               timeout=120).stdout
        label = {"labels": [{"ride_id": "never-served", "duration": 9.5}]}
        anonymous = httpx.post(f"{api.url}/feedback", json=label, timeout=10)
        token = {"Authorization": f"Bearer {env['TRIPCAST_ADMIN_TOKEN']}"}
        feedback = httpx.post(f"{api.url}/feedback", json=label, headers=token, timeout=10)
        bad = httpx.post(f"{api.url}/feedback", json={"labels": [{"ride_id": "x", "duration": -3}]}, headers=token)
    finally:
        api.stop()
    assert shot.stat().st_size > 50_000  # a picture, not a blank page
    # The plots were drawn by plotly in the browser, with one trace per series.
    assert 'class="plot-container plotly"' in dom and len(re.findall(r'class="trace scatter', dom)) >= 6
    assert len(re.findall(r'class="point"', dom)) >= len(data["windows"])  # bars of traffic per window
    embedded = json.loads(re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>', dom,
                                    re.S).group(1).replace("<\\/", "</"))
    assert embedded["windows"] == data["windows"] and len(data["windows"]) >= 9
    assert {d["action"] for d in data["decisions"]} >= {"skipped", "experiment", "promoted"} and data["alerts"]
    assert "promoted" in dom and "Evidently report" in dom
    assert data["range"] == ["2020-12-28T00:00:00", "2021-04-05T00:00:00"]  # the replay's weeks
    assert (data["outside_rides"], data["outside_windows"]) == (1, 1)
    assert "1 ride(s) in 1 smaller week(s) lie outside" in dom and "too few rides to measure" in dom
    # The experiments panel: each experiment's looks (estimate, interval, outcome) and the table of them.
    assert {e["kind"] for e in data["experiments"]} == {"experiment", "guard"} and data["looks"]
    assert '<table id="experiments">' in dom and "shadow" in dom and "beats the champion" in dom
    assert report.status_code == 200 and "PULocationID" in report.text and "Drift" in report.text
    assert len(report.content) < 500_000 and re.search(r'<div id="root_\w+"><div', drawn)  # drawn by the shared script
    # Feedback needs the token; unknown rides are reported (and kept); a negative duration is a 422.
    assert anonymous.status_code == 401 and feedback.status_code == 200 and bad.status_code == 422
    assert feedback.json() == {"stored": 1, "unknown": 1, "unknown_ride_ids": ["never-served"]}
    assert bad.json()["detail"][0]["loc"][-1] == "duration"
    # The newest window's figures are on /metrics for Prometheus.
    assert re.search(r'tripcast_monitoring\{metric="drift_share",version="\d+"\}', metrics)
    if SAVE_SCREENSHOT:  # how docs/dashboard.png is made
        shutil.copy(shot, SAVE_SCREENSHOT)
