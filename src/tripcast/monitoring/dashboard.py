"""The monitoring dashboard: one HTML page from the monitoring store, with plotly charts over time.

Drift (share of drifted features, prediction drift, zone-pair drift) and realised RMSE against their
thresholds, traffic per model version and arm, alerts and automation decisions as markers, and links to the
per-window Evidently reports. ``data`` is the same content as JSON (the page's charts are built from it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tripcast.config import Settings
from tripcast.monitoring import experiments
from tripcast.monitoring.windows import window_ending
from tripcast.store import alerts, decisions, jsonable, window_metrics

PLOTLY_JS = Path(go.__file__).resolve().parents[1] / "package_data" / "plotly.min.js"
LATEST_METRICS = ("drift_share", "prediction_drift", "od_drift", "rmse", "rmse_ratio", "rows", "labelled_rows")


def data(engine: Engine, settings: Settings) -> dict:
    """Windows (one row per window and version, a column per metric; ``measured``: enough rides for figures),
    alerts, decisions, report files; the experiments with each of their looks (and the promotion margin they
    are held to); the range shown by default (the windows large enough to measure) and the rides outside it."""
    kind, min_rows = settings.window, settings.min_window_rows
    with engine.connect() as conn:
        metrics = pd.DataFrame(conn.execute(select(window_metrics).where(window_metrics.c.kind == kind)
                                            .order_by(window_metrics.c.window_start)).mappings().all())
        fired = conn.execute(select(alerts).where(alerts.c.kind == kind).order_by(alerts.c.window_start)
                             ).mappings().all()
        decided = conn.execute(select(decisions).order_by(decisions.c.event_time, decisions.c.id)).mappings().all()
    windows: list[dict] = []
    thresholds: dict[str, float] = {}
    shown: dict = {"range": None, "outside_rides": 0, "outside_windows": 0}
    if not metrics.empty:
        keys = ["window_start", "window_end", "model_version"]
        wide = metrics.pivot_table(index=keys, columns="metric", values="value", aggfunc="last").reset_index()
        reports = metrics.dropna(subset=["report"]).drop_duplicates(keys).set_index(keys)["report"]
        wide["report"] = [reports.get(tuple(k)) for k in wide[keys].itertuples(index=False)]
        # Measured: monitoring found enough rides for figures (measure() decides; here its outcome is read).
        wide["measured"] = wide["drift_share"].notna() if "drift_share" in wide else False
        shown = _default_range(wide)
        wide = wide.astype(object).where(wide.notna(), None)
        windows = [jsonable(row) for row in wide.to_dict("records")]
        thresholds = (metrics.dropna(subset=["threshold"]).groupby("metric")["threshold"].last().to_dict())
    return {"kind": kind, "min_rows": min_rows, "windows": windows, "thresholds": thresholds, **shown,
            "alerts": [jsonable(a) for a in fired],
            "decisions": [jsonable(d, leave_out=("data",)) | {"window": str(window_ending(kind, d["event_time"]))}
                          for d in decided],
            "experiments": experiments.status(engine), "looks": experiments.looks(engine),
            "margin": settings.promotion_margin}


def _default_range(wide: pd.DataFrame) -> dict:
    """From the first to the last measured window (all windows if none is), and what lies outside: a stray
    live ride must not squeeze a replayed year into a sliver of the time axis."""
    totals = wide.groupby(["window_start", "window_end"]).agg(rows=("rows", "sum"), measured=("measured", "any"))
    totals = totals.reset_index()
    inside = totals[totals["measured"]] if totals["measured"].any() else totals
    start, end = inside["window_start"].min(), inside["window_end"].max()
    outside = totals[(totals["window_start"] < start) | (totals["window_start"] >= end)]
    return {"range": [pd.Timestamp(start).isoformat(), pd.Timestamp(end).isoformat()],
            "outside_rides": int(outside["rows"].sum()), "outside_windows": len(outside)}


def figure(content: dict) -> go.Figure:
    frame = pd.DataFrame(content["windows"])
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("drift (Evidently; zone pairs: Jensen-Shannon)",
                                        "realised RMSE (minutes) once labels arrive", "predictions per version",
                                        "experiments (the challenger's RMSE below the champion's) and guards "
                                        "(the new champion's below the old one's), with their confidence sequences"))
    _experiments(fig, content)
    if frame.empty:
        return fig
    frame["window_start"] = pd.to_datetime(frame["window_start"])
    for version, part in frame.groupby("model_version", sort=True):
        for metric, dash in (("drift_share", "solid"), ("prediction_drift", "dot"), ("od_drift", "dash")):
            if metric in part:
                fig.add_trace(go.Scatter(x=part["window_start"], y=part[metric], mode="lines+markers",
                                         name=f"v{version} {metric}", line={"dash": dash}), row=1, col=1)
        if "rmse" in part and part["rmse"].notna().any():
            fig.add_trace(go.Scatter(x=part["window_start"], y=part["rmse"], mode="lines+markers",
                                     name=f"v{version} RMSE"), row=2, col=1)
            limit = part["val_rmse"] * content["thresholds"].get("rmse_ratio", float("nan"))
            fig.add_trace(go.Scatter(x=part["window_start"], y=limit, mode="lines", name=f"v{version} RMSE alert",
                                     line={"dash": "dot", "color": "red"}), row=2, col=1)
        arms = [c for c in part.columns if c.startswith("rows_arm_")] or ["rows"]
        for column in arms:
            label = f"v{version}" + (f" {column.removeprefix('rows_arm_')}" if column != "rows" else "")
            fig.add_trace(go.Bar(x=part["window_start"], y=part[column], name=label), row=3, col=1)
    for metric in ("drift_share", "od_drift"):
        if metric in content["thresholds"]:
            fig.add_hline(y=content["thresholds"][metric], line={"color": "grey", "dash": "dot", "width": 1},
                          row=1, col=1)
    for alert in content["alerts"]:
        fig.add_vline(x=pd.Timestamp(alert["window_start"]).timestamp() * 1000, row=1, col=1,
                      line={"color": "orange", "width": 1})
    for decision in content["decisions"]:  # at the window it followed, like its alerts and figures
        if decision["action"] in ("promoted", "rejected"):
            fig.add_vline(x=_window_start(content["kind"], decision["event_time"]).timestamp() * 1000,
                          line={"color": "green" if decision["action"] == "promoted" else "red", "width": 2})
    fig.update_layout(height=1150, barmode="stack", legend={"orientation": "h"}, margin={"t": 40, "l": 50, "r": 20})
    if content.get("range"):  # the measurable windows; the slider under the charts reaches every window
        start, end = (pd.Timestamp(t) for t in content["range"])
        pad = (end - start) / 50
        fig.update_xaxes(range=[start - pad, end + pad])
        everything = [frame["window_start"].min() - pad, pd.to_datetime(frame["window_end"]).max() + pad]
        fig.update_xaxes(rangeslider={"visible": True, "thickness": 0.04, "range": everything}, row=4, col=1)
    return fig


def _experiments(fig: go.Figure, content: dict) -> None:
    """Each experiment's looks: the estimate with its interval, the margin it must beat, the outcome."""
    described = {e["id"]: e for e in content.get("experiments", [])}
    looks = pd.DataFrame(content.get("looks", []))
    if looks.empty:
        return
    looks["event_time"] = [_window_start(content["kind"], t) for t in looks["event_time"]]
    for experiment_id, part in looks.groupby("experiment_id", sort=True):
        about = described.get(experiment_id, {})
        if about.get("kind") == "guard":
            name = (f"guard {experiment_id} (v{about.get('champion_version')} vs v{about.get('challenger_version')}, "
                    "the champion it replaced)")
        else:
            name = (f"experiment {experiment_id} (v{about.get('challenger_version')} vs "
                    f"v{about.get('champion_version')}, {about.get('mode')})")
        part = part.dropna(subset=["lower", "upper"])  # a look with no labelled rides yet has no estimate
        fig.add_trace(go.Scatter(x=part["event_time"], y=part["estimate"], mode="lines+markers", name=name,
                                 error_y={"type": "data", "symmetric": False, "array": part["upper"] - part["estimate"],
                                          "arrayminus": part["estimate"] - part["lower"]}), row=4, col=1)
        ended = part[part["decision"] != "continue"]
        if not ended.empty:
            fig.add_trace(go.Scatter(x=ended["event_time"], y=ended["estimate"], mode="markers+text",
                                     text=ended["decision"], textposition="top center", name=f"{name} outcome",
                                     marker={"size": 12, "symbol": "star"}), row=4, col=1)
    if content.get("margin") is not None:
        fig.add_hline(y=content["margin"], line={"color": "green", "dash": "dot", "width": 1}, row=4, col=1)
    fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=4, col=1)
    fig.update_yaxes(tickformat="+.0%", row=4, col=1)


def page(content: dict, report_base: str = "/dashboard/reports/", plotly_src: str = "/dashboard/plotly.js") -> str:
    fig = figure(content)
    too_few = (f"<td colspan='3' class='sparse'>too few rides to measure (fewer than "
               f"{content.get('min_rows', 0):,})</td>")
    rows = "".join(
        f"<tr><td>{html.escape(str(w['window_start'])[:10])}</td><td>v{html.escape(str(w['model_version']))}</td>"
        f"<td>{_fmt(w.get('rows'), 0)}</td>"
        + (f"<td>{_fmt(w.get('drift_share'))}</td><td>{_fmt(w.get('od_drift'))}</td><td>{_fmt(w.get('rmse'))}</td>"
           if w.get("measured", True) else too_few)
        + f"<td>{_link(report_base, w.get('report'))}</td></tr>"
        for w in reversed(content["windows"]))
    alert_rows = "".join(f"<li>{html.escape(a['message'])}{_delivery(a)}</li>" for a in reversed(content["alerts"]))
    decision_rows = "".join(f"<li>{html.escape(d['window'])}: <b>{html.escape(d['action'])}</b>: "
                            f"{html.escape(d['reason'])}</li>" for d in reversed(content["decisions"]))
    experiment_rows = "".join(
        f"<tr><td>{e['id']}</td><td>{html.escape(e['kind'])}</td><td>{html.escape(e['mode'])}</td>"
        f"<td>v{html.escape(e['champion_version'])}</td><td>v{html.escape(e['challenger_version'])}</td>"
        f"<td>{html.escape(e['status'])}</td><td>{_fmt(e['labelled_rides'], 0)}</td><td>{_pct(e['estimate'])}</td>"
        f"<td>{_pct(e['interval'][0])} … {_pct(e['interval'][1])}</td>"
        f"<td style='text-align:left'>{html.escape(e['reason'] or '')}</td></tr>"
        for e in content.get("experiments", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tripcast monitoring</title>
<script src="{plotly_src}"></script>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse}}
td,th{{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:right}} h2{{margin-top:1.5em}}
td.sparse,#range{{color:#777}}</style></head>
<body><h1>tripcast monitoring ({html.escape(content['kind'])} windows)</h1>
<p id="range">{_range_note(content)}</p>
<div id="charts" style="width:100%"></div>
<script id="dashboard-data" type="application/json">{_script_json(content)}</script>
<script>const fig = {fig.to_json()};
Plotly.newPlot("charts", fig.data, fig.layout, {{responsive: true}});</script>
<h2>Automation decisions</h2><ul id="decisions">{decision_rows or '<li>none yet</li>'}</ul>
<h2>Experiments</h2><table id="experiments"><tr><th>id</th><th>kind</th><th>mode</th><th>champion</th>
<th>challenger</th><th>status</th><th>labelled rides</th><th>estimate</th><th>interval</th><th>why</th></tr>
{experiment_rows}</table>
<h2>Alerts</h2><ul id="alerts">{alert_rows or '<li>none yet</li>'}</ul>
<h2>Windows</h2><table id="windows"><tr><th>window</th><th>version</th><th>rides</th><th>drift share</th>
<th>zone-pair drift</th><th>RMSE</th><th>report</th></tr>{rows}</table></body></html>"""


def _window_start(kind: str, event_time: str) -> pd.Timestamp:
    return pd.Timestamp(window_ending(kind, pd.Timestamp(event_time).to_pydatetime()).start)


def _range_note(content: dict) -> str:
    if not content.get("range"):
        return "No window measured yet: run <code>tripcast monitor</code> once predictions are logged."
    start, end = (str(t)[:10] for t in content["range"])
    note = f"Showing {start} to {end}: the {content['kind']}s with at least {content['min_rows']:,} rides."
    if content.get("outside_rides"):
        note += (f" {content['outside_rides']:,} ride(s) in {content['outside_windows']} smaller {content['kind']}(s)"
                 " lie outside; drag the slider under the charts, or double-click a chart, to see them.")
    return html.escape(note)


def _delivery(alert: dict) -> str:
    return f" (webhook failed: {html.escape(alert['delivery_error'] or '')})" if alert["delivered"] is False else ""


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "" if value is None else f"{value:+.1%}"


def _link(base: str, name: str | None) -> str:
    return "" if not name else f'<a href="{base}{html.escape(name)}">Evidently report</a>'


def _script_json(content: dict) -> str:
    return json.dumps(content).replace("</", "<\\/")  # cannot close the script element early


def latest(engine: Engine, kind: str) -> list[dict]:
    """The newest measured window's figures, per version (for Prometheus): a stray ride in a later, too small
    window must not blank the gauges."""
    m = window_metrics.c
    with engine.connect() as conn:
        newest = conn.execute(select(m.window_start).where(m.kind == kind, m.metric == "drift_share")
                              .order_by(m.window_start.desc()).limit(1)).scalar()
        if newest is None:
            return []
        return [dict(r) for r in conn.execute(
            select(window_metrics.c.model_version, window_metrics.c.metric, window_metrics.c.value)
            .where(window_metrics.c.kind == kind, window_metrics.c.window_start == newest,
                   window_metrics.c.metric.in_(LATEST_METRICS))).mappings()]
