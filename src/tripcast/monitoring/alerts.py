"""Alert rules over the stored window metrics, and their sinks: the log and an HTTP webhook (JSON, retried).

A rule fires for a window when its metric breached its threshold in that window and in the
``alert_windows - 1`` windows before it (same model version). Each alert is stored once per rule, window
and version, with the outcome of its delivery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from sqlalchemy import and_, select
from sqlalchemy.engine import Engine
from tenacity import RetryError, retry, stop_after_attempt, wait_exponential

from tripcast.config import Settings
from tripcast.monitoring.windows import Window
from tripcast.store import alerts, jsonable, window_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    describes: str


RULES = (
    Rule("data_drift", "drift_share", "share of drifted features"),
    Rule("prediction_drift", "prediction_drift", "prediction drift"),
    Rule("od_drift", "od_drift", "zone-pair drift"),
    Rule("accuracy", "rmse_ratio", "RMSE / validation RMSE"),
)


def evaluate_rules(engine: Engine, windows: list[Window], settings: Settings) -> list[dict]:
    """New alerts for ``windows`` (already alerted windows are not alerted again); stored and delivered."""
    if not windows:
        return []
    kind = windows[0].kind
    starts = {w.start for w in windows}
    with engine.connect() as conn:
        rows = conn.execute(select(window_metrics).where(and_(
            window_metrics.c.kind == kind, window_metrics.c.metric.in_([r.metric for r in RULES]),
            window_metrics.c.window_start <= max(starts)))
            .order_by(window_metrics.c.window_start)).mappings().all()
        known = {(a.rule, a.window_start, a.model_version) for a in conn.execute(
            select(alerts.c.rule, alerts.c.window_start, alerts.c.model_version).where(alerts.c.kind == kind))}
    series: dict[tuple[str, str], list] = {}
    for row in rows:
        series.setdefault((row["metric"], row["model_version"]), []).append(row)
    fired = []
    for rule in RULES:
        for (metric, version), history in series.items():
            if metric != rule.metric:
                continue
            for i, row in enumerate(history):
                recent = history[max(0, i - settings.alert_windows + 1): i + 1]
                if (row["window_start"] in starts and len(recent) == settings.alert_windows
                        and all(r["breached"] for r in recent)
                        and (rule.name, row["window_start"], version) not in known):
                    fired.append(_alert(rule, row, settings))
    for alert in fired:
        log.warning("ALERT %s", alert["message"])
        if settings.alert_webhook_url:
            alert |= deliver(alert, settings.alert_webhook_url, settings.alert_webhook_attempts)
    if fired:
        with engine.begin() as conn:
            conn.execute(alerts.insert(), fired)
    return fired


def _alert(rule: Rule, row, settings: Settings) -> dict:
    streak = f" for {settings.alert_windows} windows" if settings.alert_windows > 1 else ""
    message = (f"{rule.name}: {rule.describes} {row['value']:.3f} >= {row['threshold']:.3f}{streak} "
               f"({Window(row['kind'], row['window_start'], row['window_end'])}, model version "
               f"{row['model_version']})")
    return {"rule": rule.name, "kind": row["kind"], "window_start": row["window_start"],
            "window_end": row["window_end"], "model_version": row["model_version"], "metric": rule.metric,
            "value": row["value"], "threshold": row["threshold"], "message": message,
            "created_at": datetime.now(UTC).replace(tzinfo=None), "delivered": None, "attempts": 0,
            "delivery_error": None}


def deliver(alert: dict, url: str, attempts: int) -> dict:
    """POST the alert as JSON, retried with back-off; returns the delivery outcome to store with it."""
    payload = jsonable(alert, leave_out=("delivered", "attempts", "delivery_error"))
    tries = 0

    @retry(stop=stop_after_attempt(max(1, attempts)), wait=wait_exponential(multiplier=0.2, max=2))
    def post() -> None:
        nonlocal tries
        tries += 1
        requests.post(url, json=payload, timeout=5).raise_for_status()

    try:
        post()
        return {"delivered": True, "attempts": tries, "delivery_error": None}
    except RetryError as exc:
        error = f"{type(exc.last_attempt.exception()).__name__}: {exc.last_attempt.exception()}"
        log.error("alert webhook %s failed after %d attempts: %s", url, tries, error)
        return {"delivered": False, "attempts": tries, "delivery_error": error[:500]}
