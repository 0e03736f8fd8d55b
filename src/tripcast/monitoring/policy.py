"""The automation policy: when may an alert start a retrain, and on which labelled rides.

Guards, all on event time (the windows' clock, so a replay behaves like production): a cooldown after each
retrain, at most ``retrain_max`` retrains per ``retrain_period_days``, and a minimum of labelled rides to
train on. Evaluation uses the latest window with labels, which training never sees; promotion itself is
the registry's policy (beat the rule baseline and the champion by the margin, on enough rows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from tripcast.config import Settings
from tripcast.monitoring.windows import Window, window_ending, window_of
from tripcast.store import decisions, jsonable, labels, predictions, window_metrics

RETRAINED = ("promoted", "rejected", "experiment")  # outcomes of a retrain (experiments' own have no rows)


@dataclass(frozen=True)
class RetrainPlan:
    go: bool
    reason: str
    trigger: str
    event_time: datetime
    train_start: datetime | None = None
    train_end: datetime | None = None
    eval_start: datetime | None = None
    eval_end: datetime | None = None
    train_rows: int = 0
    eval_rows: int = 0


def _labelled_count(conn, start: datetime, end: datetime) -> int:
    p = predictions.c
    return conn.execute(select(func.count(func.distinct(p.ride_id)))
                        .select_from(predictions.join(labels, p.ride_id == labels.c.ride_id))
                        .where(and_(p.pickup_datetime >= start, p.pickup_datetime < end))).scalar_one()


def _onset(conn, alert: dict) -> datetime:
    """Start of the run of breached windows (same rule metric, kind and version) that ends with the alert."""
    history = conn.execute(select(window_metrics.c.window_start, window_metrics.c.breached).where(and_(
        window_metrics.c.kind == alert["kind"], window_metrics.c.metric == alert["metric"],
        window_metrics.c.model_version == alert["model_version"],
        window_metrics.c.window_start <= alert["window_start"])).order_by(window_metrics.c.window_start.desc())).all()
    onset = alert["window_start"]
    for start, breached in history:
        if not breached:
            break
        onset = start
    return onset


def plan_retrain(engine: Engine, fired: list[dict], settings: Settings, now: datetime | None = None) -> RetrainPlan:
    """Whether the alerts in ``fired`` may start a retrain ``now`` (the event time monitoring reached; default:
    the end of the newest alerted window), and with which data: labelled rides since the change began (the
    first breached window of the alert's run), at most ``retrain_lookback_days`` of them, before the latest
    labelled window, which is kept for the evaluation."""
    trigger = "; ".join(a["message"] for a in fired)
    event_time = now or max(a["window_end"] for a in fired)
    kind = fired[0]["kind"]
    plan = dict(trigger=trigger, event_time=event_time)
    with engine.connect() as conn:
        retrains = conn.execute(select(decisions.c.event_time).where(and_(
            decisions.c.action.in_(RETRAINED), decisions.c.train_rows.isnot(None),
            decisions.c.event_time > event_time - timedelta(days=settings.retrain_period_days),
            decisions.c.event_time <= event_time)).order_by(decisions.c.event_time)).scalars().all()
        cooldown = timedelta(days=settings.retrain_cooldown_days)
        if retrains and event_time - retrains[-1] < cooldown:
            return RetrainPlan(False, f"cooldown: last retrain after {window_ending(kind, retrains[-1])}, next one "
                                      f"allowed from {retrains[-1] + cooldown:%Y-%m-%d %H:%M}", **plan)
        if len(retrains) >= settings.retrain_max:
            return RetrainPlan(False, f"retrain cap: {len(retrains)} retrains in the last "
                                      f"{settings.retrain_period_days:g} days (max {settings.retrain_max})", **plan)
        p = predictions.c
        latest = conn.execute(select(func.max(p.pickup_datetime))
                              .select_from(predictions.join(labels, p.ride_id == labels.c.ride_id))
                              .where(p.pickup_datetime < event_time)).scalar_one()
        if latest is None:
            return RetrainPlan(False, "deferred: no labelled rides yet", **plan)
        # The evaluation window: the latest window with enough labels (a partly labelled last window is
        # skipped), else the latest window with any.
        evaluation = window_of(kind, latest)
        candidate = evaluation
        for _ in range(4):
            if _labelled_count(conn, candidate.start, candidate.end) >= settings.promotion_min_rows:
                evaluation = candidate
                break
            candidate = Window(kind, candidate.start - (candidate.end - candidate.start), candidate.start)
        eval_rows = _labelled_count(conn, evaluation.start, evaluation.end)
        onset = min(_onset(conn, alert) for alert in fired)
        train_start = max(onset, evaluation.start - timedelta(days=settings.retrain_lookback_days))
        train_rows = _labelled_count(conn, train_start, evaluation.start) if train_start < evaluation.start else 0
    plan |= dict(train_start=train_start, train_end=evaluation.start, eval_start=evaluation.start,
                 eval_end=evaluation.end, train_rows=train_rows, eval_rows=eval_rows)
    began = window_of(kind, onset)
    if train_start >= evaluation.start:
        when = "the newest labelled" if began == evaluation else f"{began}, after the newest labelled"
        return RetrainPlan(False, f"deferred: the change began in {when} {kind} ({evaluation}, kept for the "
                                  f"evaluation): no labelled rides of it to train on yet", **plan)
    if train_rows < settings.retrain_min_rows:
        return RetrainPlan(False, f"deferred: {train_rows:,} labelled rides from {began} (when the change began) "
                                  f"to {evaluation} (kept for the evaluation), fewer than "
                                  f"{settings.retrain_min_rows:,}", **plan)
    return RetrainPlan(True, f"retrain on {train_rows:,} labelled rides, evaluate on {eval_rows:,}", **plan)


def record(engine: Engine, plan: RetrainPlan, action: str, reason: str, **details) -> dict:
    """Store a decision (skipped, promoted, rejected, failed) with its reason and the data it used; returns
    it as JSON-ready fields."""
    periods = {k: v for k, v in asdict(plan).items() if k.startswith(("train_", "eval_"))}
    data = jsonable(periods) | details.pop("data", {})
    row = {"created_at": datetime.now(UTC).replace(tzinfo=None), "trigger": plan.trigger,
           "event_time": plan.event_time, "action": action, "reason": reason,
           "train_rows": plan.train_rows or None, "eval_rows": plan.eval_rows or None,
           "data": json.dumps(data)} | details
    with engine.begin() as conn:
        # A flow run re-run after a crash records its decision once: the first attempt's, if it got that far.
        run = data.get("flow_run")
        earlier = run and conn.execute(select(decisions).where(decisions.c.data.contains(f'"flow_run": "{run}"'))
                                       ).mappings().first()
        if earlier:
            return jsonable(earlier, leave_out=("data",))
        conn.execute(decisions.insert(), [row])
    return jsonable(row, leave_out=("data",))
