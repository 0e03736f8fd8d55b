"""Monitoring and automation as Prefect flows.

``monitor``: measure the windows of logged predictions, store the figures, fire alerts, and let the
automation policy retrain. ``retrain``: train on recent labelled rides from the prediction log, register the
result as ``challenger``, compare it with the champion on the latest labelled window (which training did not
see), promote or reject, and record the decision in the monitoring store and on the model version.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.deployments.runner import EntrypointType
from sqlalchemy import make_url

from tripcast import promotion, training
from tripcast.cluster import cluster_of, mapper
from tripcast.config import Settings, load_settings
from tripcast.flows.train import features, register, train
from tripcast.monitoring import alerts, experiments, policy
from tripcast.monitoring.windows import (
    Mapper,
    Window,
    compute_window,
    labelled_training_rides,
    logged_span,
    window_of,
    windows_between,
)
from tripcast.registry import CHAMPION, Registry
from tripcast.store import shared
from tripcast.tracking import require_registry

log = logging.getLogger(__name__)


def _parse(value: str | datetime | None) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@task(cache_policy=NONE)
def measure_window(window: Window, settings: Settings, mapper: Mapper = map) -> list[dict]:
    return compute_window(shared(settings.resolved_monitoring_uri), Registry(settings), window, settings, mapper)


@flow(name="monitor")
def monitor_flow(window: str | None = None, since: str | None = None, until: str | None = None,
                 automate: bool | None = None) -> dict[str, Any]:
    """Measure every window overlapping [since, until) (default: the last four windows of the log's bulk, so
    a few stray rides after it do not move the period), fire alerts, and apply the automation policy to them."""
    settings = load_settings()
    require_registry(settings)
    kind = window or settings.window
    engine = shared(settings.resolved_monitoring_uri)
    span = logged_span(engine, kind, settings.min_window_rows)
    if span is None:
        return {"windows": [], "alerts": [], "decision": None, "note": "the prediction log is empty"}
    until_t = _parse(until) or span.bulk_last + timedelta(microseconds=1)
    last = window_of(kind, until_t)
    since_t = _parse(since) or max(span.first, last.start - 3 * (last.end - last.start))
    windows = windows_between(kind, since_t, until_t)
    with cluster_of(settings) as client:  # TRIPCAST_DASK: the windows' slices are read and tallied there
        slices_by = map if client is None else mapper(client)
        measured = {str(w): measure_window(w, settings, slices_by) for w in windows}
    fired = alerts.evaluate_rules(engine, windows, settings)
    looked = experiment_step(settings, until_t)  # first: it may end an experiment, or start a guard
    decision = None
    if fired and (settings.automate if automate is None else automate):
        decision = automate_flow_step(fired, settings, until_t)
    shown = ("rows", "drift_share", "prediction_drift", "od_drift", "rmse", "rmse_ratio")
    return {"windows": [{"window": name, "versions": sorted({r["model_version"] for r in rows}),
                         "rows": int(sum(r["value"] for r in rows if r["metric"] == "rows")),
                         "figures": {r["model_version"]: {m: figure["value"] for m in shown for figure in rows
                                                          if figure["metric"] == m
                                                          and figure["model_version"] == r["model_version"]}
                                     for r in rows}}
                        for name, rows in measured.items()],
            "alerts": [a["message"] for a in fired], "decision": decision, "experiment": looked,
            "alerted": sorted({str(Window(kind, a["window_start"], a["window_end"])) for a in fired}),
            "note": None if until else span.left_out(kind)}


@task(cache_policy=NONE)
def experiment_step(settings: Settings, event_time: datetime) -> dict[str, Any] | None:
    """A look at the running experiment or guard, and its decision applied (serving follows the registry)."""
    registry = Registry(settings)
    with registry.decision_lock():
        return experiments.review(shared(settings.resolved_monitoring_uri), registry, settings, event_time)


def automate_flow_step(fired: list[dict], settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """The policy's answer to a batch of alerts: a skipped decision, or a retrain (``now``: the event time the
    monitoring reached, where an experiment of its challenger would start)."""
    engine = shared(settings.resolved_monitoring_uri)
    champion = Registry(settings).current(CHAMPION)
    # Alerts about a version that no longer serves say nothing about the champion.
    current = [a for a in fired if a["model_version"] == champion]
    plan = policy.plan_retrain(engine, current or fired, settings, now)
    if not current:
        plan = dataclasses.replace(plan, go=False, reason=f"the alerts concern version(s) "
                                   f"{', '.join(sorted({a['model_version'] for a in fired}))}, not the champion "
                                   f"(version {champion})")
    ongoing = experiments.running(engine)
    if ongoing is not None and plan.go:  # its evidence must not be cut short by another challenger
        plan = dataclasses.replace(plan, go=False, reason=f"{experiments.describe(ongoing)} is running")
    if not plan.go:
        log.info("no retrain: %s", plan.reason)
        return policy.record(engine, plan, "skipped", plan.reason, champion_version=champion)
    try:
        return retrain_flow(plan.trigger, plan.event_time.isoformat(), plan.train_start.isoformat(),
                            plan.train_end.isoformat(), plan.eval_start.isoformat(), plan.eval_end.isoformat(),
                            now=(now or plan.event_time).isoformat())
    except Exception as exc:  # a failed retrain is a decision too: recorded, and the champion stays
        return policy.record(engine, plan, "failed", f"retrain failed: {type(exc).__name__}: {exc}",
                                     champion_version=champion)


@task(cache_policy=NONE)
def labelled(start: datetime, end: datetime, settings: Settings) -> training.MonthData:
    rides = labelled_training_rides(shared(settings.resolved_monitoring_uri), start, end)
    store = make_url(settings.resolved_monitoring_uri).render_as_string(hide_password=True)
    source = f"{store} (predictions joined to labels)"
    return training.prepare_period(rides, start, end, source, settings)


@flow(name="retrain")
def retrain_flow(trigger: str, event_time: str, train_start: str, train_end: str, eval_start: str,
                 eval_end: str, model: str | None = None, now: str | None = None) -> dict[str, Any]:
    """Train on labelled rides in [train_start, train_end), validate on [eval_start, eval_end), register the
    challenger, promote it, start an online experiment of it (TRIPCAST_EXPERIMENT) or reject it, and record
    why."""
    settings = load_settings()
    model = model or settings.retrain_model
    engine = shared(settings.resolved_monitoring_uri)
    times = [datetime.fromisoformat(t) for t in (event_time, train_start, train_end, eval_start, eval_end)]
    train_data = labelled(times[1], times[2], settings)
    eval_data = labelled(times[3], times[4], settings)
    plan = policy.RetrainPlan(True, "", trigger, times[0], *times[1:], train_rows=len(train_data.rides),
                              eval_rows=len(eval_data.rides))
    fs = features(train_data, eval_data)
    result = train(train_data, eval_data, fs, model, settings, 0, None)
    tags = {"automation.trigger": trigger[:4000], "automation.train_period": str(train_data.month),
            "automation.eval_period": str(eval_data.month)}

    def online(registry: Registry, version: str, judged: promotion.Judgement) -> dict[str, Any]:
        """Past the offline gate: an online experiment decides (TRIPCAST_EXPERIMENT), not this one window."""
        registry.record(version, {"promotion.decision": "experiment", "promotion.reason": judged.decision.reason})
        return experiments.start(engine, registry, settings, version, settings.experiment,
                                 settings.experiment_weight, f"passed the offline gate ({judged.decision.reason})",
                                 datetime.fromisoformat(now) if now else times[0], record=False)

    outcome = register(result, eval_data, settings, True, min_rows=settings.promotion_min_rows, tags=tags,
                       passed=None if settings.experiment == "off" else online)
    action = ("experiment" if outcome["then"] else "promoted") if outcome["passed_gate"] else "rejected"
    get_run_logger().info("challenger %s %s: %s", outcome["version"], action, outcome["reason"])
    return policy.record(
        engine, plan, action, outcome["reason"] if action != "experiment" else
        f"passed the offline gate ({outcome['reason']}); {experiments.describe(outcome['then'])} started",
        champion_version=outcome["champion_before"], challenger_version=outcome["version"],
        champion_rmse=outcome["champion_rmse"], challenger_rmse=outcome["challenger_rmse"],
        baseline_rmse=outcome["baseline_rmse"], data={"run_id": result.run_id, "model": model,
                                                      "compared_on": outcome["compared_on"],
                                                      "flow_run": outcome["flow_run"]})


def monitor_deployment(cron: str, name: str = "monitor"):
    """Monitoring (with the automation policy) on a cron schedule: the last windows of the prediction log."""
    return monitor_flow.to_deployment(name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
                                      description="Measure recent windows, fire alerts, retrain when a rule fires.")
