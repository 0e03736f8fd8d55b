"""End to end, with every part real: the API in its own process, Prefect flows, the MLflow registry, and the
monitoring store on PostgreSQL (production profile) or SQLite. Real months are replayed over HTTP with a drift
injected; labels arrive a window later; monitoring alerts; the policy retrains; the API follows the alias."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tripcast.config import Settings
from tripcast.registry import CHAMPION, Registry
from tripcast.rehearsal import ApiProcess, LoopOptions, run_loop, timeline_rows
from tripcast.store import connect, decisions, predictions

pytestmark = pytest.mark.slow
SAVE_SCREENSHOT = os.environ.get("TRIPCAST_SAVE_SCREENSHOT")  # read before the tests reset TRIPCAST_*
OPTIONS = dict(color="green", first="2021-02", last="2021-03", sample=0.35, drift="slower-traffic",
               drift_from="2021-03", seed=3)


def _rehearse(home: Path, mirror: Path, extra: dict[str, str]) -> tuple[Settings, object, dict[str, str]]:
    """Train the champion on 2021-01 (validated on 2021-02), then replay 2021-02..03, slower from March."""
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


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path, prefect_server: str,
             postgres_database) -> Iterator[tuple[Settings, object, dict[str, str]]]:
    saved = dict(os.environ)
    home = tmp_path_factory.mktemp("loop-promoted") / "home"
    yield _rehearse(home, tlc_mirror, {"TRIPCAST_MONITORING_URI": postgres_database()})
    os.environ.clear()
    os.environ.update(saved)


def test_drift_retrains_promotes_and_the_api_follows(promoted) -> None:
    settings, result, _ = promoted
    registry = Registry(settings)
    assert result.failed == 0 and result.sent > 20_000
    engine = connect(settings.resolved_monitoring_uri)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one()
        stored = conn.execute(sa.select(decisions).order_by(decisions.c.id)).mappings().all()
    assert logged == result.sent  # every prediction of the replay is in the PostgreSQL log

    # The first accuracy alert (week of March 1) has no labelled rides since the change yet: deferred. The
    # next one retrains on the first drifted week, evaluates on the second, and promotes version 2.
    actions = [(d["action"], d["challenger_version"]) for d in stored]
    assert actions[0] == ("skipped", None) and ("promoted", "2") in actions
    promotion = next(d for d in stored if d["action"] == "promoted")
    assert promotion["challenger_rmse"] < promotion["champion_rmse"] * (1 - settings.promotion_margin)
    assert promotion["challenger_rmse"] < promotion["baseline_rmse"]
    assert "accuracy" in promotion["trigger"] and json.loads(promotion["data"])["train_start"] == "2021-03-01T00:00:00"
    version = registry.version("2")
    assert version.tags["promotion.decision"] == "promoted" and "accuracy" in version.tags["automation.trigger"]

    # Serving followed: only versions that were champion answered, and the new one from the next window on.
    champions = set(registry.history())
    served = [set(v) for v in result.served.values()]
    assert set().union(*served) <= champions and registry.current(CHAMPION) in served[-1]
    assert served[0] == {"1"} and served[-1] == {registry.current(CHAMPION)}
    rows = timeline_rows(result)
    march = [r for r in rows if r["window"] >= "2021-03-01"]
    assert march[0]["rmse_ratio"] >= 1 + settings.rmse_increase  # the slowdown shows once labels arrive
    assert all(r["rmse_ratio"] < 1 + settings.rmse_increase for r in rows if r["window"] < "2021-03-01")
    assert march[-1]["rmse_ratio"] < 1 + settings.rmse_increase  # the retrained model is back in range


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


def test_dashboard_renders_in_headless_chromium(promoted, tmp_path: Path) -> None:
    settings, result, env = promoted
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("the dashboard test needs Chromium: apt-get install chromium (.ci/run installs it)")
    env = env | {"TRIPCAST_ADMIN_TOKEN": "dashboard-test"}
    api = ApiProcess(env)
    try:
        data = httpx.get(f"{api.url}/dashboard/data", timeout=30).json()
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--virtual-time-budget=15000", "--window-size=1400,1700"]
        shot = tmp_path / "dashboard.png"
        subprocess.run(flags + [f"--screenshot={shot}", f"{api.url}/dashboard"], check=True, capture_output=True,
                       timeout=120)
        dom = subprocess.run(flags + ["--dump-dom", f"{api.url}/dashboard"], check=True, capture_output=True,
                             text=True, timeout=120).stdout
        metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
        report = httpx.get(f"{api.url}/dashboard/reports/{data['windows'][-1]['report']}", timeout=30)
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
    assert {d["action"] for d in data["decisions"]} >= {"skipped", "promoted"} and data["alerts"]
    assert "promoted" in dom and "Evidently report" in dom
    assert report.status_code == 200 and "PULocationID" in report.text and "Drift" in report.text
    # Feedback needs the token; unknown rides are reported (and kept); a negative duration is a 422.
    assert anonymous.status_code == 401 and feedback.status_code == 200 and bad.status_code == 422
    assert feedback.json() == {"stored": 1, "unknown": 1, "unknown_ride_ids": ["never-served"]}
    assert bad.json()["detail"][0]["loc"][-1] == "duration"
    # The newest window's figures are on /metrics for Prometheus.
    assert re.search(r'tripcast_monitoring\{metric="drift_share",version="\d+"\}', metrics)
    if SAVE_SCREENSHOT:  # how docs/dashboard.png is made
        shutil.copy(shot, SAVE_SCREENSHOT)
