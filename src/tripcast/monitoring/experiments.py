"""Online experiments: a challenger against the champion on live traffic, decided by a sequential test that may
be looked at after every window (``tripcast.monitoring.stats``); and the guard after every promotion.

An **experiment** runs in one of two modes. ``shadow``: the champion answers and the challenger scores every ride
off the response path; the evidence is paired (both models' errors on each labelled ride). ``ab``: a sticky share
of rides (by ride_id) is answered by the challenger; the evidence is two independent samples. Each look (every
monitoring run) takes all labelled rides of 1-60 minutes logged since the experiment began, and decides:
promote (the challenger's RMSE beats the champion's by the promotion margin with confidence 1 - alpha), reject
(it is worse with that confidence, or it has not shown the margin within ``experiment_max_rides`` rides or
``experiment_max_days``), or continue. A **guard** follows every promotion (by an experiment, by the offline
policy, or by hand): the old champion scores in shadow for ``guard_days``; if the new one is worse than it with
confidence 1 - alpha, tripcast rolls back.

What serving should do is recorded on the registered model (``Registry.set_traffic``), which every API worker
and replica follows at its next poll; each experiment, look and outcome is recorded in the monitoring store
(``experiments``, ``experiment_looks``, ``decisions``) and as ``experiment.*`` tags on the versions.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from sqlalchemy import String, and_, or_, select, type_coerce, update
from sqlalchemy.engine import Engine

from tripcast.config import Settings
from tripcast.errors import ModelVerificationError, TripcastError
from tripcast.monitoring import stats
from tripcast.registry import CHAMPION, Registry
from tripcast.store import decisions, experiment_looks, experiments, jsonable, labels, predictions

log = logging.getLogger(__name__)
MODES = ("shadow", "ab")
RUNNING = "running"


class ExperimentError(TripcastError):
    """An experiment cannot be started or stopped as asked."""


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def running(engine: Engine) -> dict | None:
    """The experiment (or guard) running now, if any."""
    with engine.connect() as conn:
        row = conn.execute(select(experiments).where(experiments.c.status == RUNNING)
                           .order_by(experiments.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def start(engine: Engine, registry: Registry, settings: Settings, version: str, mode: str, weight: float | None,
          trigger: str, event_time: datetime, kind: str = "experiment", record: bool = True) -> dict:
    """Start an experiment of ``version`` against the champion (or, ``kind="guard"``, shadow the old champion
    ``version`` behind a new one), recorded as a decision unless the caller records its own (``record``). The
    caller holds ``registry.decision_lock()``."""
    if mode not in MODES:
        raise ExperimentError(f"mode {mode!r}: choose shadow or ab")
    if mode == "ab" and not (weight is not None and 0 < weight < 1):
        raise ExperimentError(f"weight {weight!r}: an A/B experiment needs a share of rides between 0 and 1")
    version = str(registry.version(version).version)  # an unknown version is a RegistryError naming it
    champion = registry.current(CHAMPION)
    if champion is None:
        raise ExperimentError(f"{registry.name} has no champion to compare version {version} with")
    if version == champion:
        raise ExperimentError(f"version {version} is the champion: an experiment needs another version")
    current = running(engine)
    if current is not None:
        raise ExperimentError(f"{describe(current)} is running; one at a time (tripcast experiment stop)")
    registry.verified_pipeline(registry.version(version))  # serving would refuse it anyway: say so now
    row = {"kind": kind, "mode": mode, "weight": weight if mode == "ab" else None, "champion_version": champion,
           "challenger_version": version, "status": RUNNING, "trigger": trigger[:4000], "started_at": _now(),
           "started_event": event_time}
    with engine.begin() as conn:
        row["id"] = conn.execute(experiments.insert().values(**row)).inserted_primary_key[0]
    registry.set_traffic(version, {"mode": mode, "weight": str(weight or ""), "id": str(row["id"]), "kind": kind})
    what = describe(row)
    log.warning("%s started: %s", what, trigger)
    if record:
        _record(engine, row, "experiment" if kind == "experiment" else "guard", f"{what} started: {trigger}",
                event_time)
    return row


def stop(engine: Engine, registry: Registry, reason: str, event_time: datetime | None = None) -> dict:
    """End the running experiment (or guard) without a decision; serving goes back to the champion alone. The
    caller holds ``registry.decision_lock()``."""
    current = running(engine)
    if current is None:
        raise ExperimentError("no experiment is running")
    _end(engine, registry, current, "stopped", f"stopped: {reason}", event_time or current["started_event"])
    return current | {"status": "stopped", "reason": f"stopped: {reason}"}


def evidence(engine: Engine, experiment: dict, settings: Settings) -> stats.Look:
    """One look at everything logged for the experiment since it began: labelled rides of 1-60 minutes."""
    p, lab = predictions.c, labels.c
    champion, challenger = experiment["champion_version"], experiment["challenger_version"]
    if experiment["mode"] == "shadow":
        which = and_(p.model_version == champion, p.shadow_version == challenger, p.shadow_prediction.isnot(None))
    else:
        which = or_(and_(p.arm == "champion", p.model_version == champion),
                    and_(p.arm == "challenger", p.model_version == challenger))
    query = (select(p.ride_id, p.arm, p.prediction, p.shadow_prediction, lab.actual_duration,
                    type_coerce(p.pickup_datetime, String).label("pickup"),
                    type_coerce(lab.dropoff_datetime, String).label("dropoff"))
             .select_from(predictions.join(labels, p.ride_id == lab.ride_id))
             .where(p.logged_at >= experiment["started_at"], which).order_by(p.logged_at, p.id))
    with engine.connect() as conn:
        frame = pd.read_sql(query, conn).drop_duplicates("ride_id")  # a ride predicted twice counts once
    from_dropoff = (pd.to_datetime(frame["dropoff"], format="ISO8601")
                    - pd.to_datetime(frame["pickup"], format="ISO8601")).dt.total_seconds() / 60
    actual = frame["actual_duration"].astype(float).fillna(from_dropoff).to_numpy()
    meant = (actual >= settings.min_duration) & (actual <= settings.max_duration)  # as validation filters
    served = (frame["prediction"].to_numpy(float)[meant] - actual[meant]) ** 2
    margin, alpha = settings.promotion_margin, settings.experiment_alpha
    planned, least = settings.experiment_planned_rides, settings.experiment_min_rides
    if experiment["mode"] == "ab":
        return stats.look(served, served, (frame["arm"] == "challenger").to_numpy()[meant], experiment["weight"],
                          margin, alpha, planned, least)
    shadowed = (frame["shadow_prediction"].to_numpy(float)[meant] - actual[meant]) ** 2
    if experiment["kind"] == "guard":  # the new champion answers; the old one (the incumbent) is in shadow
        return stats.look(shadowed, served, None, None, margin, alpha, planned, least)
    return stats.look(served, shadowed, None, None, margin, alpha, planned, least)


def review(engine: Engine, registry: Registry, settings: Settings, event_time: datetime) -> dict | None:
    """Look at the running experiment or guard (after every monitoring run) and act on what the test says;
    before that, give a champion promoted without a guard its guard. The caller holds the decision lock.
    Returns the look, with the decision taken (``continue``, or the outcome), or None."""
    current = running(engine)
    champion = registry.current(CHAMPION)
    if current is not None and champion != current["champion_version"]:  # promoted meanwhile, e.g. by hand
        _end(engine, registry, current, "stopped", f"stopped: the champion changed to version {champion} while it "
             "ran", event_time)
        current = None
    if current is None:
        current = _guard_if_due(engine, registry, settings, event_time)
        if current is None:
            return None
    result = evidence(engine, current, settings)
    decision, reason = _decide(current, result, settings, event_time)
    look = {"experiment_id": current["id"], "looked_at": _now(), "event_time": event_time, "rides": result.rides,
            "rides_challenger": result.rides_candidate, "champion_rmse": result.incumbent_rmse,
            "challenger_rmse": result.candidate_rmse, "estimate": result.improvement,
            "lower": result.improvement_bounds()[0], "upper": result.improvement_bounds()[1], "decision": decision}
    look = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in look.items()}
    with engine.begin() as conn:
        conn.execute(experiment_looks.insert(), [look])
    tags = {"experiment.id": str(current["id"]), "experiment.mode": current["mode"],
            "experiment.rides": str(result.rides), "experiment.estimate": f"{result.improvement:.4f}",
            "experiment.interval": "[{:.4f}, {:.4f}]".format(*result.improvement_bounds()),
            "experiment.decision": decision}
    if decision == "promoted":
        registry.promote_locked(current["challenger_version"], reason, tags)
        _end(engine, registry, current, "promoted", reason, event_time)
        _guard(engine, registry, settings, current["challenger_version"], current["champion_version"], event_time,
               f"promoted by experiment {current['id']}")
    elif decision == "rejected":
        registry.record(current["challenger_version"], tags | {"promotion.decision": "rejected",
                                                                "promotion.reason": reason})
        _end(engine, registry, current, "rejected", reason, event_time)
    elif decision == "rolled_back":
        registry.rollback_locked(tags | {"rollback.reason": reason})
        _end(engine, registry, current, "rolled_back", reason, event_time)
    elif decision in ("passed", "stopped"):
        _end(engine, registry, current, decision, reason, event_time)
    if decision != "continue":
        log.warning("%s %s: %s", describe(current), decision.replace("_", " "), reason)
    return jsonable(look) | {"kind": current["kind"], "mode": current["mode"], "reason": reason,
                             "champion_version": current["champion_version"],
                             "challenger_version": current["challenger_version"]}


def _decide(experiment: dict, look: stats.Look, settings: Settings, event_time: datetime) -> tuple[str, str]:
    """(decision, reason with the figures) for one look."""
    low, high = look.improvement_bounds()
    new, old = experiment["challenger_version"], experiment["champion_version"]  # the candidate, the incumbent
    if experiment["kind"] == "guard":  # the new champion is the candidate; the one it replaced, the incumbent
        new, old = old, new
    figures = (f"{look.rides:,} labelled rides, RMSE {look.candidate_rmse:.3f} (v{new}) vs {look.incumbent_rmse:.3f} "
               f"(v{old}): {look.improvement:+.1%}, {1 - settings.experiment_alpha:.0%} confidence sequence "
               f"[{low:+.1%}, {high:+.1%}]") if np.isfinite(low) else f"{look.rides:,} labelled rides"
    elapsed = event_time - experiment["started_event"]
    if experiment["kind"] == "guard":
        if look.verdict == "worse":
            return "rolled_back", (f"version {new} is worse than version {old}, the champion it replaced, with "
                                   f"{1 - settings.experiment_alpha:.0%} confidence: {figures}")
        # Labels arrive late: the guard holds until it has seen its days *and* enough labelled rides.
        if elapsed >= timedelta(days=settings.guard_days) and look.rides >= settings.experiment_min_rides:
            return "passed", f"version {new} held against version {old} for {settings.guard_days:g} days: {figures}"
        if elapsed >= timedelta(days=settings.experiment_max_days):
            return "stopped", (f"no verdict on version {new} against version {old} within "
                               f"{settings.experiment_max_days:g} days: {figures}")
        return "continue", figures
    if look.verdict == "better":
        return "promoted", (f"beats the champion by more than {settings.promotion_margin:.1%} with "
                            f"{1 - settings.experiment_alpha:.0%} confidence: {figures}")
    if look.verdict == "worse":
        return "rejected", f"worse than the champion with {1 - settings.experiment_alpha:.0%} confidence: {figures}"
    if look.rides >= settings.experiment_max_rides or elapsed >= timedelta(days=settings.experiment_max_days):
        return "rejected", (f"did not show a gain of {settings.promotion_margin:.1%} within "
                            f"{settings.experiment_max_rides:,} labelled rides or {settings.experiment_max_days:g} "
                            f"days: {figures}")
    return "continue", figures


def _guard_if_due(engine: Engine, registry: Registry, settings: Settings, event_time: datetime) -> dict | None:
    """A guard for a champion that was promoted without one (by hand, or by the offline policy)."""
    champion = registry.current(CHAMPION)
    if champion is None or not settings.guard_days:
        return None
    with engine.connect() as conn:
        guarded = conn.execute(select(experiments.c.id).where(
            experiments.c.kind == "guard", experiments.c.champion_version == champion)).first()
    if guarded is not None:
        return None
    tags = registry.version(champion).tags
    if tags.get("rollback.restored_at", "") >= tags.get("promotion.at", "~"):  # restored by a rollback
        return None
    history = registry.history()
    previous = history[-2] if history and history[-1] == champion and len(history) > 1 else (
        history[-1] if history and history[-1] != champion else None)
    if previous is None:
        return None
    return _guard(engine, registry, settings, champion, previous, event_time, f"version {champion} was promoted")


def _guard(engine: Engine, registry: Registry, settings: Settings, new: str, old: str, event_time: datetime,
           why: str) -> dict | None:
    if not settings.guard_days:
        return None
    try:
        return start(engine, registry, settings, old, "shadow", None,
                     f"{why}: version {old}, the champion it replaced, scores in shadow for {settings.guard_days:g} "
                     "days", event_time, kind="guard")
    except ModelVerificationError as exc:  # nothing to compare with: the old champion cannot be loaded
        log.warning("no guard for version %s: %s", new, exc)
        return None


def _end(engine: Engine, registry: Registry, experiment: dict, status: str, reason: str,
         event_time: datetime) -> None:
    registry.clear_traffic()
    with engine.begin() as conn:
        conn.execute(update(experiments).where(experiments.c.id == experiment["id"]).values(
            status=status, reason=reason[:4000], ended_at=_now(), ended_event=event_time))
    _record(engine, experiment, status, reason, event_time)


def _record(engine: Engine, experiment: dict, action: str, reason: str, event_time: datetime) -> None:
    """The outcome as an automation decision (the loop's timeline and the dashboard list them)."""
    with engine.begin() as conn:
        conn.execute(decisions.insert(), [{
            "created_at": _now(), "trigger": experiment["trigger"], "event_time": event_time, "action": action,
            "reason": reason[:4000], "champion_version": experiment["champion_version"],
            "challenger_version": experiment["challenger_version"],
            "data": json.dumps({"experiment": experiment["id"], "kind": experiment["kind"],
                                "mode": experiment["mode"], "weight": experiment["weight"]})}])


def describe(experiment: dict) -> str:
    """An experiment or guard in a few words."""
    if experiment["kind"] == "guard":
        return (f"guard {experiment['id']} (version {experiment['champion_version']}, previous champion "
                f"{experiment['challenger_version']} in shadow)")
    share = f" {experiment['weight']:.0%}" if experiment["mode"] == "ab" else ""
    return (f"experiment {experiment['id']} ({experiment['mode']}{share}: version {experiment['challenger_version']} "
            f"vs champion {experiment['champion_version']})")


def status(engine: Engine) -> list[dict]:
    """Every experiment and guard, newest first, with its latest look."""
    with engine.connect() as conn:
        rows = conn.execute(select(experiments).order_by(experiments.c.id.desc())).mappings().all()
        looks = conn.execute(select(experiment_looks).order_by(experiment_looks.c.id)).mappings().all()
    latest = {look["experiment_id"]: look for look in looks}
    out = []
    for row in rows:
        look = latest.get(row["id"], {})
        out.append(jsonable(row) | {
            "labelled_rides": look.get("rides", 0), "challenger_rides": look.get("rides_challenger", 0),
            "estimate": look.get("estimate"), "interval": [look.get("lower"), look.get("upper")],
            "looks": sum(1 for x in looks if x["experiment_id"] == row["id"])})
    return out


def current(engine: Engine) -> dict | None:
    """The running experiment (or guard) with its latest look's figures (for /metrics)."""
    experiment = running(engine)
    if experiment is None:
        return None
    with engine.connect() as conn:
        look = conn.execute(select(experiment_looks).where(experiment_looks.c.experiment_id == experiment["id"])
                            .order_by(experiment_looks.c.id.desc()).limit(1)).mappings().first()
    return experiment | {"look": dict(look) if look else None}


def looks(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        return [jsonable(r) for r in conn.execute(select(experiment_looks).order_by(experiment_looks.c.id))
                .mappings()]
