"""``tripcast loop``: rehearse the automated loop on real months.

Rides of the chosen months (optionally with a drift injected) are replayed as traffic against the running
API over HTTP, one monitoring window at a time in event time. Their actual durations arrive as feedback
``label_delay`` windows later. After each window the monitoring flow measures the windows that changed,
fires alerts, and the automation policy retrains, promotes or rejects; the API follows the registry alias
(nudged through ``/admin/reload``, as an MLflow registry webhook would). The result is a timeline.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from tripcast import features as feats
from tripcast import interrupts
from tripcast.batch import scorable_month
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.data.drift import inject
from tripcast.errors import TripcastError
from tripcast.monitoring import dashboard
from tripcast.monitoring.windows import LENGTHS, Window, windows_between
from tripcast.registry import CHAMPION, Registry
from tripcast.serving.schemas import MAX_DISTANCE, MAX_LABEL_MINUTES
from tripcast.store import shared

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance", "ride_id", "pickup_datetime"]


@dataclass
class LoopOptions:
    color: str = "green"
    first: str = "2021-01"
    last: str = "2021-03"
    sample: float = 1.0  # share of each month's rides replayed
    speedup: float = 0.0  # 0: as fast as the API answers; N: event time runs N times faster than real time
    label_delay: int = 1  # windows between a ride and its actual duration arriving
    drift: str | None = None  # a kind from tripcast.data.drift, injected from drift_from on
    drift_from: str | None = None
    drift_strength: float | None = None
    api_url: str | None = None  # None: start `tripcast serve` for the rehearsal
    workers: int = 1  # of the API it starts
    batch_size: int = 1_000
    seed: int = 0


@dataclass
class LoopResult:
    kind: str
    sent: int = 0
    failed: int = 0
    labels_sent: int = 0
    served: dict[str, Counter] = field(default_factory=dict)  # window -> versions that answered
    bootstrap: str | None = None
    seconds: float = 0.0
    timeline: dict = field(default_factory=dict)  # tripcast.monitoring.dashboard.data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiProcess:
    """``tripcast serve`` in a subprocess on a free loopback port, until ``stop``."""

    def __init__(self, env: dict[str, str], timeout: float = 90, output: Path | None = None,
                 workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = output  # where its log goes (default: a pipe, shown if it does not start)
        sink = output.open("ab") if output is not None else subprocess.PIPE
        self.process = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(self.port),
                                         "--workers", str(workers)], env=os.environ | env, stdout=sink,
                                        stderr=subprocess.STDOUT, preexec_fn=interrupts.owned_child)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        said = self.output.read_bytes() if self.output is not None else self.process.stdout.read()
        raise TripcastError(f"the API did not become ready:\n{said.decode()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()  # uvicorn shuts down gracefully: the prediction log is flushed
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def replay_rides(options: LoopOptions, settings: Settings) -> pd.DataFrame:
    """The rides to replay, in pickup order, with their actual durations; drifted months where asked."""
    frames = []
    drift_from = tlc.Month.parse(options.drift_from or options.first) if options.drift else None
    for month in tlc.month_range(options.first, options.last):
        source = settings
        if drift_from is not None and month >= drift_from:
            mirror = settings.home / "drift" / options.drift / "mirror"
            inject(options.color, month, options.drift, settings, mirror, options.drift_strength, options.seed)
            source = settings.with_overrides(tlc_mirror=str(mirror), home=settings.home / "drift" / options.drift)
            tlc.cache_path(options.color, month, source).unlink(missing_ok=True)  # a stale drift: re-read
        rides, _ = scorable_month(options.color, month, source)
        rides = rides[rides["trip_distance"] <= MAX_DISTANCE]  # the API refuses longer "rides" (meter errors)
        if options.sample < 1:
            rides = rides.sample(frac=options.sample, random_state=options.seed)
        frames.append(rides.assign(actual=feats.duration_minutes(rides)))
    rides = pd.concat(frames, ignore_index=True).sort_values("pickup_datetime", kind="stable")
    return rides.reset_index(drop=True)


def _bootstrap(options: LoopOptions, settings: Settings) -> str | None:
    """Train a first champion on the first month (validated on the next) when the registry has none."""
    if Registry(settings).current(CHAMPION) is not None:
        return None
    from tripcast.flows.train import train_flow

    first = tlc.Month.parse(options.first)
    result = train_flow(options.color, str(first), str(first.shift(1)), settings.retrain_model)
    return (f"no champion: trained v{result['version']} on {options.color} {first}, validated on {first.shift(1)} "
            f"(RMSE {result['metrics']['val_rmse']:.3f}), {result['reason']}")


class ApiClient:
    """The API as the rehearsal (and the tests) drive it: predictions in batches, labels, reloads."""

    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.admin = {"Authorization": f"Bearer {token}"}

    def log_state(self) -> dict[str, float]:
        """The prediction log's figures summed over the API's workers (``/model`` has only the answering one's)."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {"tripcast_log_written": "written", "tripcast_log_queue_depth": "queued",
                  "tripcast_log_dropped": "dropped"}
        state = dict.fromkeys(wanted.values(), 0.0)
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            if family.name in wanted:
                state[wanted[family.name]] += sum(sample.value for sample in family.samples)
        return state

    def predict(self, rides: pd.DataFrame, batch_size: int) -> tuple[int, Counter]:
        body = rides[REQUEST_COLUMNS].assign(pickup_datetime=rides["pickup_datetime"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
        failed, versions = 0, Counter()
        records = body.to_dict("records")
        for i in range(0, len(records), batch_size):
            part = records[i:i + batch_size]
            try:
                response = self.client.post("/predict/batch", json={"rides": part})
            except httpx.TransportError:
                failed += len(part)
                continue
            if response.status_code != 200:
                failed += len(part)
                continue
            versions.update(p["model"]["version"] for p in response.json()["predictions"])
        return failed, versions

    def feedback(self, rides: pd.DataFrame, batch_size: int = 5_000) -> int:
        labelled = rides[(rides["actual"] > 0) & (rides["actual"] <= MAX_LABEL_MINUTES)]  # what /feedback takes
        labels = [{"ride_id": r, "duration": float(d)} for r, d in zip(labelled["ride_id"], labelled["actual"],
                                                                          strict=True)]
        for i in range(0, len(labels), batch_size):
            self.client.post("/feedback", json={"labels": labels[i:i + batch_size]},
                             headers=self.admin).raise_for_status()
        return len(labels)

    def wait_logged(self, expected: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.log_state()
            if state["queued"] == 0 and state["written"] + state["dropped"] >= expected:
                return
            time.sleep(0.1)
        log.warning("the prediction log is behind: %d of %d predictions written after %.0f s; monitoring goes on",
                    state["written"], expected, timeout)

    def reload(self) -> None:
        self.client.post("/admin/reload", headers=self.admin)


def check_options(options: LoopOptions, settings: Settings) -> None:
    """Refuse options the loop cannot run with, in one line, before anything starts."""
    tlc.check_color(options.color)
    tlc.month_range(options.first, options.last)
    if not 0 < options.sample <= 1:
        raise TripcastError(f"sample must be in (0, 1], got {options.sample}")
    if options.api_url and not settings.admin_token:
        raise TripcastError("a running API (--api-url) takes labels on /feedback with its admin token: set "
                            "TRIPCAST_ADMIN_TOKEN to the API's token")


def run_loop(options: LoopOptions, settings: Settings, progress=None,
             say: Callable[[str], None] = lambda _: None) -> LoopResult:
    """Replay, label, monitor and automate window by window; returns the counts and the timeline. ``progress``
    hears of every window, ``say`` of the steps before the first (they take half a minute)."""
    from tripcast.flows.monitor import monitor_flow

    started = time.perf_counter()
    check_options(options, settings)
    result = LoopResult(kind=settings.window)
    say(f"reading {options.color} {options.first}..{options.last}" + (
        f" ({options.drift} from {options.drift_from or options.first})" if options.drift else ""))
    rides = replay_rides(options, settings)
    if Registry(settings).current(CHAMPION) is None:
        say(f"no champion: training one on {options.color} {options.first}")
    result.bootstrap = _bootstrap(options, settings)
    if options.api_url is None:
        say(f"starting the API ({options.workers} worker{'s' * (options.workers > 1)}); then "
            f"{len(rides):,} rides, window by window")
    first, last = tlc.Month.parse(options.first), tlc.Month.parse(options.last)
    windows = windows_between(settings.window, first.start.to_pydatetime(), last.end.to_pydatetime())
    token = settings.admin_token or secrets.token_urlsafe(16)
    server = None
    if options.api_url is None:
        server = ApiProcess({"TRIPCAST_ADMIN_TOKEN": token, "TRIPCAST_POLL_SECONDS": "1",
                             "TRIPCAST_LOG_FLUSH_SECONDS": "0.2"}, workers=options.workers)
    api = ApiClient(options.api_url or server.url, token)
    try:
        written_before = api.log_state()["written"]
        pickups = rides["pickup_datetime"].to_numpy()

        def window_rides(window: Window) -> pd.DataFrame:
            lo, hi = np.searchsorted(pickups, [np.datetime64(window.start), np.datetime64(window.end)])
            return rides.iloc[lo:hi]

        for i, window in enumerate(windows):
            tick = time.perf_counter()
            batch = window_rides(window)
            failed, versions = api.predict(batch, options.batch_size)
            result.sent += len(batch)
            result.failed += failed
            result.served[str(window)] = versions
            api.wait_logged(written_before + result.sent - result.failed)
            labelled = windows[i - options.label_delay] if i >= options.label_delay else None
            if labelled is not None:
                result.labels_sent += api.feedback(window_rides(labelled))
            since = (labelled or window).start
            interrupts.check()
            outcome = monitor_flow(window=settings.window, since=since.isoformat(), until=window.end.isoformat())
            interrupts.check()
            api.reload()  # a promotion, an experiment started or ended: served from the next window on
            if progress:
                progress(window, len(batch), outcome)
            if options.speedup:
                pause = (window.end - window.start).total_seconds() / options.speedup
                time.sleep(max(0.0, pause - (time.perf_counter() - tick)))
        # The labels still owed arrive after the last window; the last windows get their accuracy.
        for window in windows[max(0, len(windows) - options.label_delay):]:
            result.labels_sent += api.feedback(window_rides(window))
        if options.label_delay and windows:
            tail = windows[max(0, len(windows) - options.label_delay)]
            monitor_flow(window=settings.window, since=tail.start.isoformat(), until=windows[-1].end.isoformat())
    finally:
        if server is not None:
            server.stop()
    result.timeline = dashboard.data(shared(settings.resolved_monitoring_uri), settings)
    result.seconds = time.perf_counter() - started
    return result


def timeline_rows(result: LoopResult) -> list[dict]:
    """One row per window: rides, versions served, drift, RMSE, alerts and decisions."""
    by_window: dict[str, list[dict]] = {}
    for row in result.timeline["windows"]:
        by_window.setdefault(row["window_start"][:10], []).append(row)
    alerts = Counter(a["window_start"][:10] for a in result.timeline["alerts"])
    decided: dict[str, list[str]] = {}
    for d in result.timeline["decisions"]:
        # A guard's outcome concerns the new champion; an experiment's, the challenger.
        version = d.get("champion_version") if d["action"] in ("guard", "passed", "rolled_back") \
            else d.get("challenger_version")
        decided.setdefault(d["window"].split()[-1], []).append(d["action"] + (f" v{version}" if version else ""))
    rows = []
    for window, versions in result.served.items():
        start = window.split()[-1]
        figures = max(by_window.get(start, [{}]), key=lambda r: r.get("rows") or 0)
        end = f"{pd.Timestamp(start) + LENGTHS[result.kind]:%Y-%m-%d}"
        rows.append({"window": start, "rides": sum(versions.values()),
                     "served": ", ".join(f"v{v}" for v in sorted(versions, key=int)),
                     "drift_share": figures.get("drift_share"), "prediction_drift": figures.get("prediction_drift"),
                     "od_drift": figures.get("od_drift"), "rmse": figures.get("rmse"),
                     "rmse_ratio": figures.get("rmse_ratio"), "alerts": alerts.get(start, 0),
                     "experiment": _running_in(result.timeline.get("experiments", []), start, end),
                     "decisions": "; ".join(decided.get(start, []))})
    return rows


def _running_in(experiments: list[dict], start: str, end: str) -> str:
    """The experiments and guards that ran during a window (event time), in a few words."""
    found = [(f"guard v{e['challenger_version']}" if e["kind"] == "guard"
              else f"{e['mode']} v{e['challenger_version']}")
             for e in sorted(experiments, key=lambda e: e["id"])
             if e["started_event"][:10] < end and (e["ended_event"] or "9999")[:10] > start]
    return ", ".join(found)


def save_timeline(result: LoopResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(timeline_rows(result)).to_csv(path, index=False)
    return path
