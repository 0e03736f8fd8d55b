#!/usr/bin/env python3
"""tripcast's Grafana dashboards, written as JSON into deploy/grafana/dashboards/ (Grafana provisions them from
there; tests/test_production.py runs every query against the real stores).

    python deploy/grafana/dashboards.py

The service dashboard reads Prometheus (requests, latency, the prediction log, the registry, alerts); the model
dashboard reads the monitoring store in PostgreSQL (drift, RMSE against its threshold, traffic per version and
arm, tripcast's alerts, automation decisions, experiments).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMETHEUS = {"type": "prometheus", "uid": "tripcast-prometheus"}
STORE = {"type": "grafana-postgresql-datasource", "uid": "tripcast-monitoring"}


def promql(title: str, *queries: tuple[str, str], unit: str = "short", kind: str = "timeseries") -> dict:
    return {"title": title, "type": kind, "datasource": PROMETHEUS, "fieldConfig": {"defaults": {"unit": unit}},
            "targets": [{"refId": chr(65 + i), "datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(queries)]}


def sql(title: str, query: str, kind: str = "timeseries", unit: str = "short") -> dict:
    return {"title": title, "type": kind, "datasource": STORE, "fieldConfig": {"defaults": {"unit": unit}},
            "targets": [{"refId": "A", "datasource": STORE, "editorMode": "code", "rawQuery": True,
                         "format": "time_series" if kind == "timeseries" else "table",
                         "rawSql": " ".join(query.split())}]}


def dashboard(uid: str, title: str, panels: list[dict], since: str) -> dict:
    for i, panel in enumerate(panels):  # two panels a row
        panel["id"] = i + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {"uid": uid, "title": title, "tags": ["tripcast"], "timezone": "browser", "schemaVersion": 39,
            "time": {"from": since, "to": "now"}, "refresh": "30s", "panels": panels}


SERVICE = dashboard("tripcast-service", "tripcast: service", [
    promql("Requests per second by path and status",
           ('sum by (path, status) (rate(tripcast_requests_total[$__rate_interval]))', "{{path}} {{status}}"),
           unit="reqps"),
    promql("Latency of /predict (p50, p99)",
           ('histogram_quantile(0.5, sum by (le) (rate(tripcast_request_seconds_bucket{path="/predict"}'
            '[$__rate_interval])))', "p50"),
           ('histogram_quantile(0.99, sum by (le) (rate(tripcast_request_seconds_bucket{path="/predict"}'
            '[$__rate_interval])))', "p99"), unit="s"),
    promql("Rides predicted per second by version and arm",
           ("sum by (version, arm) (rate(tripcast_predictions_total[$__rate_interval]))", "v{{version}} {{arm}}"),
           unit="short"),
    promql("Prediction log: waiting in memory and in the journal",
           ("sum by (instance) (tripcast_log_queue_depth)", "queue {{instance}}"),
           ("sum by (instance) (tripcast_log_journal_backlog_bytes)", "journal bytes {{instance}}")),
    promql("Replicas up, store up, version served",
           ('up{job="tripcast-api"}', "up {{instance}}"), ("tripcast_log_store_up", "store {{instance}}"),
           ('tripcast_served_version{alias="champion"}', "champion {{instance}}")),
    promql("Model reload failures (registry unreachable or a version refused)",
           ("sum by (instance, alias) (delta(tripcast_model_reload_failures[5m]))", "{{instance}} {{alias}}")),
    promql("Alerts firing", ('sum by (alertname) (ALERTS{alertstate="firing"})', "{{alertname}}"), kind="stat"),
    promql("Experiment: challenger's RMSE below the champion's (estimate and interval)",
           ('max by (challenger) (tripcast_experiment{metric="estimate"})', "estimate v{{challenger}}"),
           ('max by (challenger) (tripcast_experiment{metric="lower"})', "lower"),
           ('max by (challenger) (tripcast_experiment{metric="upper"})', "upper"), unit="percentunit"),
], "now-6h")

MODEL = dashboard("tripcast-model", "tripcast: model", [
    sql("Drift per window (share of features, zone pairs, predictions)", """
        SELECT window_start AS time, metric || ' v' || model_version AS metric, value
        FROM window_metrics WHERE $__timeFilter(window_start)
          AND metric IN ('drift_share', 'od_drift', 'prediction_drift') AND value IS NOT NULL
        ORDER BY 1"""),
    sql("RMSE against its alert threshold", """
        SELECT window_start AS time, metric || ' v' || model_version AS metric, value
        FROM window_metrics WHERE $__timeFilter(window_start) AND metric IN ('rmse', 'val_rmse')
          AND value IS NOT NULL
        UNION ALL
        SELECT window_start, 'threshold v' || model_version, threshold * (
                 SELECT v.value FROM window_metrics v WHERE v.kind = r.kind AND v.window_start = r.window_start
                   AND v.model_version = r.model_version AND v.metric = 'val_rmse')
        FROM window_metrics r WHERE $__timeFilter(window_start) AND metric = 'rmse_ratio' AND threshold IS NOT NULL
        ORDER BY 1"""),
    sql("Rides logged per hour by version and arm", """
        SELECT date_trunc('hour', pickup_datetime) AS time, 'v' || model_version || ' ' || arm AS metric,
               count(*) AS value
        FROM predictions WHERE $__timeFilter(pickup_datetime) GROUP BY 1, 2 ORDER BY 1"""),
    sql("Labelled share of logged rides per day", """
        SELECT date_trunc('day', p.pickup_datetime) AS time, 'labelled' AS metric,
               avg(CASE WHEN l.ride_id IS NULL THEN 0.0 ELSE 1.0 END) AS value
        FROM predictions p LEFT JOIN labels l ON l.ride_id = p.ride_id
        WHERE $__timeFilter(p.pickup_datetime) GROUP BY 1 ORDER BY 1""", unit="percentunit"),
    sql("tripcast's alerts", """
        SELECT created_at AS "raised", rule, model_version AS "version", round(value::numeric, 3) AS value,
               round(threshold::numeric, 3) AS threshold, message, delivered
        FROM alerts WHERE $__timeFilter(window_end) ORDER BY window_end DESC LIMIT 100""", kind="table"),
    sql("Automation decisions", """
        SELECT created_at AS "decided", action, reason, champion_version AS champion,
               challenger_version AS challenger, round(champion_rmse::numeric, 3) AS "champion RMSE",
               round(challenger_rmse::numeric, 3) AS "challenger RMSE"
        FROM decisions WHERE $__timeFilter(event_time) ORDER BY event_time DESC LIMIT 100""", kind="table"),
    sql("Experiments and guards", """
        SELECT e.started_at AS started, e.kind, e.mode, e.champion_version AS champion,
               e.challenger_version AS challenger, e.status, e.reason,
               (SELECT max(rides) FROM experiment_looks k WHERE k.experiment_id = e.id) AS "labelled rides"
        FROM experiments e ORDER BY e.started_at DESC LIMIT 50""", kind="table"),
], "now-30d")


def main() -> None:
    for board in (SERVICE, MODEL):
        path = HERE / "dashboards" / f"{board['uid']}.json"
        path.write_text(json.dumps(board, indent=2) + "\n")
        print(f"wrote {path.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
