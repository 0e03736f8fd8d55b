"""Monitoring on real TLC months: drift windows, delayed labels, alerts and their webhook, the automation
policy's guards. Predictions are logged straight into the store here (as batch scoring would log them);
tests/test_loop.py drives the same path through the real API."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from tripcast import features as feats
from tripcast.batch import scorable_month
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.data.drift import inject
from tripcast.metrics import regression_metrics
from tripcast.monitoring import alerts, experiments, policy, reports
from tripcast.monitoring.feedback import join_month
from tripcast.monitoring.windows import Window, compute_window, window_of, windows_between
from tripcast.registry import CHAMPION, Registry
from tripcast.rehearsal import free_port
from tripcast.store import alerts as alert_table
from tripcast.store import connect, decisions, labels, predictions, record_labels, upsert, window_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path, prefect_server: str) -> Iterator[dict]:
    """A champion trained on green 2021-01 (validated on 2021-02) through the real training flow."""
    from tripcast.flows.train import train_flow

    home = tmp_path_factory.mktemp("monitoring") / "home"
    env = {"TRIPCAST_HOME": str(home), "TRIPCAST_TLC_MIRROR": str(tlc_mirror), "TRIPCAST_PROGRESS": "false",
           "TRIPCAST_CONFIG": str(home / "absent.toml")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings = Settings(home=home, tlc_mirror=str(tlc_mirror), progress=False)
    train_flow("green", "2021-01", "2021-02", "lightgbm")
    registry = Registry(settings)
    mv, pipeline = registry.load_pipeline(CHAMPION)
    yield {"settings": settings, "registry": registry, "version": str(mv.version), "pipeline": pipeline}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def log_rides(settings: Settings, world: dict, rides: pd.DataFrame) -> None:
    """Score rides with the champion and write them to the prediction log, as the serving side does."""
    now = datetime.now(UTC).replace(tzinfo=None)
    frame = pd.DataFrame({
        "ride_id": rides["ride_id"], "logged_at": now, "pickup_datetime": rides["pickup_datetime"],
        "PULocationID": rides["PULocationID"], "DOLocationID": rides["DOLocationID"],
        "trip_distance": rides["trip_distance"], "prediction": world["pipeline"].predict(rides),
        "model_version": world["version"], "arm": "champion", "source": "batch"})
    with connect(settings.resolved_monitoring_uri).begin() as conn:
        conn.execute(predictions.insert(), frame.to_dict("records"))


def month_rides(settings: Settings, month: str, source: Settings | None = None) -> pd.DataFrame:
    rides, _ = scorable_month("green", tlc.Month.parse(month), source or settings)
    return rides


def figures(rows: list[dict]) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows}


def fresh(world: dict, tmp_path: Path, **changes) -> Settings:
    """The world's registry with a monitoring store of its own."""
    return world["settings"].with_overrides(monitoring_uri=f"sqlite:///{tmp_path / 'monitoring.db'}", **changes)


def test_real_months_2021_02_is_quiet_and_2023_03_drifts(world: dict, tmp_path: Path) -> None:
    settings = fresh(world, tmp_path)
    engine = connect(settings.resolved_monitoring_uri)
    log_rides(settings, world, month_rides(settings, "2021-02"))
    log_rides(settings, world, month_rides(settings, "2023-03"))
    quiet = windows_between("week", datetime(2021, 2, 1), datetime(2021, 3, 1))
    drifted = windows_between("week", datetime(2023, 3, 6), datetime(2023, 3, 27))
    measured = {w: figures(compute_window(engine, world["registry"], w, settings)) for w in quiet + drifted}

    assert "rows_vs_expected" not in measured[quiet[0]]  # nothing to compare the first window with
    second, first = measured[quiet[1]], measured[quiet[0]]
    assert second["rows_vs_expected"] == pytest.approx(second["rows"] / first["rows"])
    for window in quiet:  # four full weeks of February 2021: no drift
        assert measured[window]["drift_share"] < settings.drift_share
        assert measured[window]["od_drift"] < settings.od_drift_threshold
        assert measured[window]["prediction_drift"] < settings.drift_threshold
    assert not alerts.evaluate_rules(engine, quiet, settings)
    for window in drifted:  # two years and a pandemic later
        assert measured[window]["drift_share"] >= settings.drift_share
        assert measured[window]["od_drift"] >= settings.od_drift_threshold
    fired = alerts.evaluate_rules(engine, drifted, settings)
    assert {(a["rule"], a["window_start"]) for a in fired} >= {("data_drift", w.start) for w in drifted}
    assert not alerts.evaluate_rules(engine, drifted, settings)  # an alert is raised once per window
    reports = sorted(p.name for p in (settings.home / "reports").glob("week-2023-03-06-*.html"))
    assert reports == [f"week-2023-03-06-v{world['version']}.html"]


def test_reports_share_evidently_s_script_and_old_ones_are_pruned(world: dict, tmp_path: Path,
                                                                 chromium: list[str]) -> None:
    settings = fresh(world, tmp_path, reports_keep=2, home=tmp_path / "kept")  # the world's registry still
    engine = connect(settings.resolved_monitoring_uri)
    log_rides(settings, world, month_rides(settings, "2021-02"))
    weeks = windows_between("week", datetime(2021, 2, 1), datetime(2021, 3, 1))
    for week in weeks:
        compute_window(engine, world["registry"], week, settings)
    folder = settings.home / "reports"
    kept = sorted(p.name for p in folder.glob("*.html"))
    assert kept == [f"week-2021-02-{d}-v{world['version']}.html" for d in (15, 22)]
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".html") == sorted([reports.FONT, reports.SCRIPT])
    assert all((folder / name).stat().st_size < 500_000 for name in kept)  # Evidently's own: ~3.9 MB each
    with engine.connect() as conn:
        linked = dict(conn.execute(sa.select(window_metrics.c.window_start, window_metrics.c.report)
                                   .where(window_metrics.c.metric == "rows")).all())
    assert linked == {w.start: (f"week-{w.start:%Y-%m-%d}-v{world['version']}.html"
                                if w.start.day >= 15 else None) for w in weeks}
    # The slim report draws in a browser from the shared script beside it.
    dom = subprocess.run(chromium + ["--dump-dom", (folder / kept[-1]).as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert re.search(r'<div id="root_\w+"><div', dom) and "MuiTableCell" in dom and "Drifted Columns" in dom

    none = fresh(world, tmp_path, reports_keep=0, home=tmp_path / "none")
    assert {r["report"] for r in compute_window(engine, world["registry"], weeks[0], none)} == {None}
    assert not (none.home / "reports").exists()


def test_injected_drift_is_detected_in_its_first_window(world: dict, tmp_path: Path) -> None:
    settings = fresh(world, tmp_path)
    engine = connect(settings.resolved_monitoring_uri)
    mirror = tmp_path / "mirror"
    inject("green", "2021-03", "zone-shift", settings, mirror)
    drifted_source = settings.with_overrides(tlc_mirror=str(mirror), home=tmp_path / "drifted")
    log_rides(settings, world, month_rides(settings, "2021-02"))
    log_rides(settings, world, month_rides(settings, "2021-03", drifted_source))
    before, first = Window("week", datetime(2021, 2, 22), datetime(2021, 3, 1)), window_of("week", datetime(2021, 3, 1))
    assert figures(compute_window(engine, world["registry"], before, settings))["od_drift"] < 0.06
    after = figures(compute_window(engine, world["registry"], first, settings))
    assert after["od_drift"] >= settings.od_drift_threshold and after["drift_share"] >= settings.drift_share
    assert {a["rule"] for a in alerts.evaluate_rules(engine, [before, first], settings)} >= {"data_drift", "od_drift"}


def test_labels_arrive_later_and_unknown_rides_are_kept(world: dict, tmp_path: Path) -> None:
    settings = fresh(world, tmp_path)
    engine = connect(settings.resolved_monitoring_uri)
    rides = month_rides(settings, "2021-02")
    log_rides(settings, world, rides)
    window = Window("week", datetime(2021, 2, 8), datetime(2021, 2, 15))
    before = figures(compute_window(engine, world["registry"], window, settings))
    assert before["labelled_rows"] == 0 and "rmse" not in before

    result = join_month("green", "2021-02", settings)
    assert result["stored"] == len(rides) and result["unknown"] == 0
    after = figures(compute_window(engine, world["registry"], window, settings))
    inside = rides[(rides["pickup_datetime"] >= window.start) & (rides["pickup_datetime"] < window.end)]
    actual = feats.duration_minutes(inside)
    kept = (actual >= settings.min_duration) & (actual <= settings.max_duration)
    expected = regression_metrics(actual[kept], world["pipeline"].predict(inside)[kept])
    assert after["labelled_rows"] == kept.sum()
    assert after["rmse"] == pytest.approx(expected["rmse"]) and after["mae"] == pytest.approx(expected["mae"])
    assert after["rmse_ratio"] == pytest.approx(expected["rmse"] / after["val_rmse"])
    with engine.connect() as conn:  # figures are replaced, not duplicated, when a window is measured again
        assert conn.execute(sa.text("SELECT count(*) FROM window_metrics WHERE metric = 'rmse'")).scalar_one() == 1

    # Labels for rides that were never logged are reported, and kept for when (if) the prediction arrives.
    outcome = record_labels(engine, [{"ride_id": "no-such-ride", "actual_duration": 12.0},
                                     {"ride_id": rides["ride_id"].iloc[0], "actual_duration": 11.0}], "api")
    assert outcome == {"stored": 2, "unknown": ["no-such-ride"]}
    with engine.connect() as conn:
        kept_labels = dict(conn.execute(sa.select(labels.c.ride_id, labels.c.actual_duration)).all())
    assert kept_labels["no-such-ride"] == 12.0 and kept_labels[rides["ride_id"].iloc[0]] == 11.0


def test_a_stray_live_ride_moves_neither_the_monitored_period_nor_the_dashboard(world: dict, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """A replayed February 2021 and one ride stamped now (the README's /predict without a pickup time)."""
    from tripcast.flows.monitor import monitor_flow
    from tripcast.monitoring import dashboard

    settings = fresh(world, tmp_path)
    monkeypatch.setenv("TRIPCAST_MONITORING_URI", settings.resolved_monitoring_uri)
    engine = connect(settings.resolved_monitoring_uri)
    log_rides(settings, world, month_rides(settings, "2021-02"))
    now = datetime.now().replace(microsecond=0)
    log_rides(settings, world, month_rides(settings, "2021-03").head(1).assign(ride_id="live", pickup_datetime=now))

    result = monitor_flow(automate=False)
    assert [w["window"] for w in result["windows"]] == [f"week 2021-02-{d:02d}" for d in (1, 8, 15, 22)]
    assert all(w["figures"][world["version"]]["drift_share"] is not None for w in result["windows"])
    assert result["note"] == ("1 ride(s) after week 2021-02-22 are in weeks too small to measure; pass --until "
                              "to include them")
    stray = window_of("week", now)
    assert [w["window"] for w in monitor_flow(since=str(stray.start), until=str(stray.end),
                                              automate=False)["windows"]] == [str(stray)]

    content = dashboard.data(engine, settings)
    assert content["range"] == ["2021-02-01T00:00:00", "2021-03-01T00:00:00"]
    assert (content["outside_rides"], content["outside_windows"]) == (1, 1)
    assert [w["measured"] for w in content["windows"]] == [True] * 4 + [False]
    axis = dashboard.figure(content).layout.xaxis
    assert axis.range[0] < datetime(2021, 2, 1) < datetime(2021, 3, 1) < axis.range[1] < datetime(2021, 3, 2)
    page = dashboard.page(content)
    assert "too few rides to measure (fewer than 500)" in page
    assert "1 ride(s) in 1 smaller week(s) lie outside" in page


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_ride_labelled_twice_in_one_call_keeps_its_last_label(store: str, tmp_path: Path,
                                                                 postgres_database) -> None:
    # On PostgreSQL one upsert may not touch a row twice: this was a 503 "store unavailable, retry" for ever.
    engine = connect(f"sqlite:///{tmp_path / 'store.db'}" if store == "sqlite" else postgres_database())
    outcome = record_labels(engine, [{"ride_id": "twice", "actual_duration": 3.0},
                                     {"ride_id": "once", "actual_duration": 5.0},
                                     {"ride_id": "twice", "actual_duration": 4.0}], "api")
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(labels.c.ride_id, labels.c.actual_duration)).all())
    engine.dispose()
    assert outcome == {"stored": 2, "unknown": ["twice", "once"]} and stored == {"twice": 4.0, "once": 5.0}


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _breached(engine, settings: Settings, version: str, start: datetime, value: float = 0.8) -> Window:
    window = Window("week", start, start + pd.Timedelta(days=7).to_pytimedelta())
    with engine.begin() as conn:
        upsert(conn, window_metrics, [{
            "kind": "week", "window_start": window.start, "window_end": window.end, "model_version": version,
            "metric": "drift_share", "value": value, "threshold": settings.drift_share, "breached": value >= 0.5,
            "computed_at": datetime.now(UTC).replace(tzinfo=None)}],
            ["kind", "window_start", "model_version", "metric"])
    return window


def test_webhook_alerts_are_delivered_or_their_failure_recorded(world: dict, tmp_path: Path) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    settings = fresh(world, tmp_path, alert_webhook_url=url, alert_windows=2)
    engine = connect(settings.resolved_monitoring_uri)
    first = _breached(engine, settings, "1", datetime(2021, 5, 3))
    assert alerts.evaluate_rules(engine, [first], settings) == []  # one breached window of the two needed
    second = _breached(engine, settings, "1", datetime(2021, 5, 10))
    fired = alerts.evaluate_rules(engine, [second], settings)
    receiver.shutdown()
    assert [a["rule"] for a in fired] == ["data_drift"] and fired[0]["delivered"] and fired[0]["attempts"] == 1
    assert _Receiver.received[-1]["rule"] == "data_drift" and _Receiver.received[-1]["value"] == 0.8
    assert "for 2 windows" in _Receiver.received[-1]["message"]

    down = settings.with_overrides(alert_webhook_url=f"http://127.0.0.1:{free_port()}/hook", alert_webhook_attempts=3)
    third = _breached(engine, down, "1", datetime(2021, 5, 17))
    failed = alerts.evaluate_rules(engine, [third], down)
    assert failed[0]["delivered"] is False and failed[0]["attempts"] == 3
    assert "ConnectionError" in failed[0]["delivery_error"]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(alert_table.c.delivered, alert_table.c.attempts)
                              .order_by(alert_table.c.window_start)).all()
    assert [tuple(r) for r in stored] == [(True, 1), (False, 3)]


def test_guards_hold_under_a_storm_of_alerts(world: dict, tmp_path: Path, monkeypatch) -> None:
    """Twelve alert batches in a row: one retrain, the rest held by the cooldown; with no cooldown, the cap."""
    from tripcast.flows.monitor import automate_flow_step

    monitoring_uri = f"sqlite:///{tmp_path / 'monitoring.db'}"
    monkeypatch.setenv("TRIPCAST_MONITORING_URI", monitoring_uri)
    monkeypatch.setenv("TRIPCAST_RETRAIN_MIN_ROWS", "2000")
    settings = fresh(world, tmp_path, retrain_min_rows=2000)
    engine = connect(settings.resolved_monitoring_uri)
    rides = month_rides(settings, "2021-02")
    log_rides(settings, world, rides)
    join_month("green", "2021-02", settings)
    weeks = windows_between("week", datetime(2021, 2, 1), datetime(2021, 2, 28))
    for week in weeks:
        compute_window(engine, world["registry"], week, settings)
    trigger = window_of("week", datetime(2021, 3, 1))

    def storm(count: int, run_settings: Settings, since: datetime) -> list[str]:
        """Alert batches about the champion of the moment, whose drift began at ``since``."""
        actions = []
        for i in range(count):
            champion = world["registry"].current(CHAMPION)
            for week in windows_between("week", since, trigger.end):
                _breached(engine, run_settings, champion, week.start, 0.9)
            alert = {"rule": "data_drift", "kind": "week", "metric": "drift_share", "model_version": champion,
                     "window_start": trigger.start, "window_end": trigger.end, "message": f"storm {i}"}
            actions.append(automate_flow_step([alert], run_settings)["action"])
        return actions

    # A drift that began in the alerting window: the labelled February weeks before it are not "since the
    # change", so the answer is to wait, not to retrain on pre-drift data.
    assert storm(1, settings, trigger.start) == ["skipped"]
    # A drift that began with February: one retrain, then the cooldown holds.
    actions = storm(12, settings, datetime(2021, 2, 1))
    assert actions[0] in policy.RETRAINED and actions[1:] == ["skipped"] * 11
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(decisions.c.reason).order_by(decisions.c.id)).scalars().all()
    assert reasons[0].startswith("deferred") and all(r.startswith("cooldown") for r in reasons[2:]), reasons

    monkeypatch.setenv("TRIPCAST_RETRAIN_COOLDOWN_DAYS", "0")
    monkeypatch.setenv("TRIPCAST_RETRAIN_MAX", "2")
    no_cooldown = settings.with_overrides(retrain_cooldown_days=0, retrain_max=2)
    # The retrain's challenger passed the offline gate and is in a shadow experiment: no other retrain may cut
    # its evidence short, cooldown or not. Stopped, the cap holds.
    assert actions[0] == "experiment" and storm(1, no_cooldown, datetime(2021, 2, 1)) == ["skipped"]
    with engine.connect() as conn:
        held = conn.execute(sa.select(decisions.c.reason).order_by(decisions.c.id.desc()).limit(1)).scalar_one()
    assert held.startswith("experiment 1 (shadow: version") and held.endswith("is running"), held
    with world["registry"].decision_lock():
        experiments.stop(engine, world["registry"], "the storm test goes on", trigger.end)
    actions = storm(3, no_cooldown, datetime(2021, 2, 1))
    assert actions[0] in policy.RETRAINED and actions[1:] == ["skipped", "skipped"]
    with engine.connect() as conn:
        retrains = conn.execute(sa.select(sa.func.count()).where(decisions.c.action.in_(policy.RETRAINED)))
        assert retrains.scalar_one() == 2
        last = conn.execute(sa.select(decisions.c.reason).order_by(decisions.c.id.desc()).limit(1)).scalar_one()
    assert last.startswith("retrain cap: 2 retrains")
    versions = world["registry"].versions()
    assert {v.tags.get("automation.eval_period") for v in versions[-2:]} == {"2021-02-22..2021-03-01"}
    np.testing.assert_array_equal(len(versions), int(world["version"]) + 2)


def test_retention_moves_old_rides_to_parquet_and_monitoring_and_labels_work_across_the_cut(
        world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tripcast.flows.retention import retention_flow
    from tripcast.monitoring.retention import archive_predictions

    settings = fresh(world, tmp_path, retention_days=35.0)
    monkeypatch.setenv("TRIPCAST_MONITORING_URI", settings.resolved_monitoring_uri)
    monkeypatch.setenv("TRIPCAST_RETENTION_DAYS", "35")
    engine = connect(settings.resolved_monitoring_uri)
    january, february = month_rides(settings, "2021-01"), month_rides(settings, "2021-02")
    log_rides(settings, world, january)
    log_rides(settings, world, february)
    first_week = Window("week", datetime(2021, 2, 1), datetime(2021, 2, 8))
    before = figures(compute_window(engine, world["registry"], first_week, settings))
    with engine.connect() as conn:
        old = set(conn.execute(sa.select(predictions.c.ride_id).where(predictions.c.pickup_datetime
                                                                      < datetime(2021, 2, 1))).scalars())
    assert len(old) > 70_000  # January, and the odd ride the TLC files under a neighbouring month

    # 2021-03-10 less 35 days is in the week of Monday 2021-02-01: the cut falls there, on a window's start.
    result = retention_flow(datetime(2021, 3, 10))
    assert result["cut"] == "2021-02-01T00:00:00" and result["rows"] == len(old)
    archived = pd.concat([pd.read_parquet(f) for f in sorted(settings.archive_dir.glob("predictions-*.parquet"))],
                         ignore_index=True)
    assert set(archived["ride_id"]) == old and len(archived) == len(old) and archived["id"].is_unique
    assert (archived["pickup_datetime"] < datetime(2021, 2, 1)).all()
    both = pd.concat([january, february]).set_index("ride_id")
    assert archived["prediction"].to_numpy() == pytest.approx(
        world["pipeline"].predict(both.loc[archived["ride_id"]].reset_index()), abs=1e-9)
    months = {re.fullmatch(r"predictions-(\d{4}-\d{2})-ids-\d+-\d+\.parquet", Path(f).name)[1] for f in result["files"]}
    assert "2021-01" in months and max(months) < "2021-02"  # one set of files per month
    assert not list(settings.archive_dir.glob(".*.part"))  # no half-written file left beside them
    with engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.count(), sa.func.min(predictions.c.pickup_datetime))
                            .select_from(predictions)).one()
    assert left[0] == len(january) + len(february) - len(old) and left[1] >= datetime(2021, 2, 1)
    # Again: nothing more to move, no file written twice.
    assert archive_predictions(engine, settings.archive_dir, datetime(2021, 2, 1), batch_rows=5_000).rows == 0
    assert len(list(settings.archive_dir.glob("*.parquet"))) == len(result["files"])

    # Monitoring past the cut is untouched (the first window after it is whole); labels join for rides in the
    # store, and the archived rides' labels are kept as unknown, as for rides never logged.
    assert figures(compute_window(engine, world["registry"], first_week, settings)) == before
    assert join_month("green", "2021-02", settings)["unknown"] == 0
    late = join_month("green", "2021-01", settings)
    assert late["unknown"] == len(old & set(january["ride_id"]))
    labelled = figures(compute_window(engine, world["registry"], first_week, settings))
    assert labelled["labelled_rows"] > 10_000 and labelled["rmse"] > 0


def test_retention_shorter_than_a_retrain_s_lookback_is_refused() -> None:
    from tripcast.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"TRIPCAST_RETENTION_DAYS \(20\) must be at least "
                                          r"retrain_lookback_days \+ 7 \(35\): retraining reads that far back"):
        load_settings(env={"TRIPCAST_RETENTION_DAYS": "20"})


def test_a_decision_is_recorded_once_per_registration_of_a_flow_run(tmp_path: Path) -> None:
    """A retrain re-run after a crash (flows/recovery.py) records the decision its first attempt recorded, once."""
    engine = connect(f"sqlite:///{tmp_path / 'monitoring.db'}")
    plan = policy.RetrainPlan(True, "", "accuracy alert", datetime(2021, 3, 8))
    first = policy.record(engine, plan, "rejected", "no gain", challenger_version="4",
                          data={"flow_run": "5d0f5c1e-8d6c-4bb6-9c55-3d1c0a6f0003/0"})
    again = policy.record(engine, plan, "promoted", "a second attempt's view", challenger_version="5",
                          data={"flow_run": "5d0f5c1e-8d6c-4bb6-9c55-3d1c0a6f0003/0"})
    other = policy.record(engine, plan, "rejected", "another run", challenger_version="6",
                          data={"flow_run": "5d0f5c1e-8d6c-4bb6-9c55-3d1c0a6f0003/1"})
    with engine.connect() as conn:
        rows = conn.execute(sa.select(decisions.c.action, decisions.c.challenger_version)
                            .order_by(decisions.c.id)).all()
    assert [tuple(r) for r in rows] == [("rejected", "4"), ("rejected", "6")]
    assert again["action"] == first["action"] == "rejected" and again["challenger_version"] == "4"
    assert other["challenger_version"] == "6"


def test_a_window_tallied_in_slices_with_drift_on_a_sample_agrees_with_the_whole(
        world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts are exact whatever the slices; drift on a uniform sample of 5,000 of a week's ~17,000 rides of
    2023-03 (a drifted month) lands near the whole window's, with the same verdicts; the sample's size is stored.
    Slices tallied on a Dask cluster give the in-process figures exactly."""
    from tripcast.cluster import connect as connect_cluster
    from tripcast.cluster import mapper
    from tripcast.config import DaskTarget
    from tripcast.monitoring import windows

    settings = fresh(world, tmp_path, reports_keep=0)
    engine = connect(settings.resolved_monitoring_uri)
    log_rides(settings, world, month_rides(settings, "2023-03"))
    week = window_of("week", datetime(2023, 3, 13))
    whole = figures(compute_window(engine, world["registry"], week, settings))
    monkeypatch.setattr(windows, "SLICE_ROWS", 4_000)  # five slices
    sampled_settings = settings.with_overrides(drift_sample_rows=5_000)
    sampled = figures(compute_window(engine, world["registry"], week, sampled_settings))
    assert whole["rows"] > 15_000 and "drift_sample_rows" not in whole
    assert sampled["drift_sample_rows"] == pytest.approx(5_000, rel=0.05)
    for exact in ("rows", "missing_share", "unknown_zone_share", "distance_out_of_range_share", "od_drift"):
        assert sampled[exact] == pytest.approx(whole[exact], rel=1e-12), exact
    for drift in ("drift_PULocationID", "drift_DOLocationID", "drift_trip_distance", "drift_pickup_hour",
                  "prediction_drift"):
        assert sampled[drift] == pytest.approx(whole[drift], abs=0.03), drift
    assert (sampled["drift_share"] >= settings.drift_share) == (whole["drift_share"] >= settings.drift_share)
    with connect_cluster(DaskTarget(None, 2), sampled_settings) as client:
        on_cluster = figures(compute_window(engine, world["registry"], week, sampled_settings, mapper(client)))
    assert on_cluster == sampled
