"""Benchmark: the error rates of tripcast's online decisions and of its drift alarms, on real rides.

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/experiments.py [--experiments 1000]

**Decisions.** Two real LightGBM models (trained on green 2021-01 and 2021-02) and their errors on the
80,372 rides of 2021-03, which neither saw; the challenger's errors scaled so that its true RMSE is 1.00x
(equally good), 0.99x (better by exactly the 1 % margin: the hardest case that must not be promoted), 0.97x
(3 % better: should be promoted) or 1.03x (3 % worse) the champion's. Each simulated experiment draws rides as
traffic would and is looked at every 2,000 labelled rides, as the monitoring flow would after each window
(tripcast.monitoring.simulation): shadow (paired), and A/B at 50 % and 10 % of rides to the challenger. Prints the
share promoted and the labelled rides needed, for tripcast's sequential test and for a naive one-sided z-test
re-run at every look.

**Drift alarms.** A champion trained on 2021-01 (its reference: 2021-02) watches the weeks of 2021-01..03 at
full, 50 % and 30 % sampling, and partial weeks (three days); a retrained model whose reference is one week of
35 % sampled rides watches the other weeks of 2021-03 at 35 %: the share of windows that alarm, with the
sample-size-aware thresholds and with the fixed ones alone. Then 2023-03 traffic against the 2021 champion, and
each injected drift of 2021-03: does its first full week alarm?

Ends with one JSON line (``false_promotion``, ``power``, ``worse_promoted``, ``naive_*``, ``drift_false_alarm``,
``drift_detected``). Targets: false promotion <= 5 % (alpha), power >= 80 % at 3 %, a worse challenger promoted
<= 5 %; <= 5 % of stable windows alarming; every drift seen in its first full week.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from tripcast import features as feats
from tripcast import training
from tripcast.batch import scorable_month
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.data.drift import inject
from tripcast.models import TripDurationPipeline, build
from tripcast.monitoring.simulation import alarms, logged, reference_of, scaled, simulate

RATIOS = {"equal": 1.0, "at_margin": 0.99, "better_3pct": 0.97, "worse_3pct": 1.03}
ARMS = {"shadow": ("shadow", 0.5), "ab_50": ("ab", 0.5), "ab_10": ("ab", 0.1)}


def fit(rides: pd.DataFrame) -> TripDurationPipeline:
    pre = feats.Preprocessor()
    return TripDurationPipeline("lightgbm", build("lightgbm").fit(pre.transform(rides), feats.targets(rides)), pre)


def decisions(months: dict, experiments: int, power_horizon: int) -> dict:
    champion, challenger = fit(months["2021-01"].rides), fit(months["2021-02"].rides)
    test = months["2021-03"].rides
    actual = feats.targets(test)
    residuals = champion.predict(test) - actual, challenger.predict(test) - actual
    out: dict = {"rides_in_population": len(actual)}
    for arm, (mode, weight) in ARMS.items():
        for name, ratio in RATIOS.items():
            started = time.perf_counter()
            horizon = power_horizon if name == "better_3pct" else 200_000
            runs = experiments if name != "better_3pct" or mode == "shadow" else max(200, experiments // 5)
            rates = simulate(*scaled(*residuals, ratio), mode, weight, max_rides=horizon, experiments=runs,
                             batch=25 if mode == "shadow" else 10)
            out.setdefault(arm, {})[name] = rates.__dict__ | {"experiments": runs, "max_rides": horizon}
            print(f"{arm:7s} {name:12s} promoted {rates.promoted:6.1%} (naive z-test {rates.naive_promoted:6.1%}), "
                  f"rejected as worse {rates.rejected_worse:6.1%}, median rides to promote "
                  f"{'-' if rates.rides_to_promote is None else f'{rates.rides_to_promote:,.0f}'}  "
                  f"[{runs} experiments, {time.perf_counter() - started:.0f} s]", flush=True)
    return out


def _drifts(hits: dict[str, bool]) -> set[str]:
    """The drift rules among a window's alarms (accuracy is not drift)."""
    return {rule for rule, hit in hits.items() if hit and rule != "accuracy"}


def weeks(rides: pd.DataFrame, first: datetime, last: datetime, days: int = 7) -> list[pd.DataFrame]:
    """Windows of ``days`` from the Mondays in [first, last)."""
    found, start = [], first
    while start < last:
        part = rides[(rides["pickup_datetime"] >= start) & (rides["pickup_datetime"] < start + timedelta(days=days))]
        found.append(part)
        start += timedelta(days=7)
    return found


def drift(settings: Settings, months: dict, home: Path) -> dict:
    champion = fit(months["2021-01"].rides)
    reference = reference_of(champion, months["2021-02"].inputs, "1", settings)
    traffic = pd.concat([scorable_month("green", tlc.Month.parse(m), settings)[0]
                         for m in ("2021-01", "2021-02", "2021-03")], ignore_index=True)
    rng = np.random.default_rng(0)
    stable = {}
    for label, share, days in (("full", 1.0, 7), ("50pct", 0.5, 7), ("30pct", 0.3, 7), ("partial_3_days", 1.0, 3),
                               ("partial_3_days_30pct", 0.3, 3)):
        counts = {"windows": 0, "alarms": 0, "alarms_fixed_thresholds": 0, "new_year_alarms": 0}
        for window in weeks(traffic, datetime(2020, 12, 28), datetime(2021, 3, 29), days):
            window = window[rng.random(len(window)) < share]
            if len(window) < settings.min_window_rows:
                continue
            aware, fixed = (_drifts(a) for a in alarms(logged(champion, window, "1"), reference, settings))
            if window["pickup_datetime"].min() < datetime(2021, 1, 4):  # New Year: a real change, counted apart
                counts["new_year_alarms"] += bool(aware)
                continue
            counts["windows"] += 1
            counts["alarms"] += bool(aware)
            counts["alarms_fixed_thresholds"] += bool(fixed)
            counts.setdefault("rules", []).extend(sorted(aware))
        stable[label] = counts | {"rate": counts["alarms"] / counts["windows"],
                                  "rate_fixed_thresholds": counts["alarms_fixed_thresholds"] / counts["windows"]}
        print(f"stable weeks, {label:21s}: {counts['alarms']}/{counts['windows']} windows alarm "
              f"({stable[label]['rate']:.1%}{'; ' + ', '.join(counts.get('rules', [])) if counts['alarms'] else ''})"
              f"; with the fixed thresholds alone {counts['alarms_fixed_thresholds']}/{counts['windows']}; the New "
              f"Year window: {counts['new_year_alarms']}", flush=True)
    # A retrained model whose reference is one week of 35 % sampled rides, watching the other March weeks.
    march = weeks(traffic, datetime(2021, 3, 1), datetime(2021, 3, 29))
    small_ref = march[0][rng.random(len(march[0])) < 0.35]
    small = reference_of(champion, small_ref, "2", settings)
    counts = {"windows": 0, "alarms": 0, "alarms_fixed_thresholds": 0}
    for window in march[1:]:
        aware, fixed = (_drifts(a) for a in alarms(logged(champion, window[rng.random(len(window)) < 0.35], "2"),
                                                   small, settings))
        counts["windows"] += 1
        counts["alarms"] += bool(aware)
        counts["alarms_fixed_thresholds"] += bool(fixed)
    stable["small_reference_35pct"] = counts | {"rate": counts["alarms"] / counts["windows"],
                                                "rate_fixed_thresholds": counts["alarms_fixed_thresholds"]
                                                / counts["windows"]}
    print(f"a reference of {len(small_ref):,} rides (one week at 35 %): {counts['alarms']}/{counts['windows']} "
          f"windows alarm; with the fixed thresholds alone {counts['alarms_fixed_thresholds']}/{counts['windows']}")
    pooled = sum(v["alarms"] for v in stable.values()) / sum(v["windows"] for v in stable.values())
    # Detection: the first full week of each change.
    detected = {}
    changed = {"2023-03 traffic": scorable_month("green", tlc.Month.parse("2023-03"), settings)[0]}
    for kind in ("slower-traffic", "longer-distances", "zone-shift"):
        mirror = home / "drift" / kind
        inject("green", "2021-03", kind, settings, mirror)
        source = settings.with_overrides(tlc_mirror=str(mirror), home=home / "drift-home" / kind)
        changed[kind] = scorable_month("green", tlc.Month.parse("2021-03"), source)[0]
    for name, rides in changed.items():
        monday = rides["pickup_datetime"].min().normalize()
        monday += timedelta(days=(7 - monday.weekday()) % 7)
        week = rides[(rides["pickup_datetime"] >= monday) & (rides["pickup_datetime"] < monday + timedelta(days=7))]
        hits = alarms(logged(champion, week, "1"), reference, settings)[0]
        detected[name] = {"week": f"{monday:%Y-%m-%d}", "rules": sorted(r for r, h in hits.items() if h)}
        print(f"{name:17s} first full week {monday:%Y-%m-%d}: alarms {', '.join(detected[name]['rules']) or 'NONE'}",
              flush=True)
    return {"stable": stable, "false_alarm_pooled": pooled, "detected": detected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=1000, help="simulated experiments per case")
    parser.add_argument("--power-horizon", type=int, default=1_500_000,
                        help="labelled rides an experiment may take in the power cases")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        settings = Settings(home=home, tlc_mirror=os.environ.get("TRIPCAST_TLC_MIRROR"), progress=False)
        months = {m: training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02", "2021-03")}
        found = decisions(months, args.experiments, args.power_horizon)
        drifted = drift(settings, months, home)
    figures = {"bench": "experiments", "alpha": settings.experiment_alpha, "margin": settings.promotion_margin,
               "false_promotion": {arm: found[arm]["equal"]["promoted"] for arm in ARMS},
               "false_promotion_at_margin": {arm: found[arm]["at_margin"]["promoted"] for arm in ARMS},
               "power": {arm: found[arm]["better_3pct"]["promoted"] for arm in ARMS},
               "rides_to_promote": {arm: found[arm]["better_3pct"]["rides_to_promote"] for arm in ARMS},
               "worse_promoted": {arm: found[arm]["worse_3pct"]["promoted"] for arm in ARMS},
               "naive_false_promotion": {arm: found[arm]["equal"]["naive_promoted"] for arm in ARMS},
               "naive_false_promotion_at_margin": {arm: found[arm]["at_margin"]["naive_promoted"] for arm in ARMS},
               "drift_false_alarm": {k: v["rate"] for k, v in drifted["stable"].items()}
               | {"pooled": drifted["false_alarm_pooled"]},
               "drift_false_alarm_fixed_thresholds": {k: v["rate_fixed_thresholds"]
                                                      for k, v in drifted["stable"].items()},
               "drift_detected": {k: v["rules"] for k, v in drifted["detected"].items()}, "details": found}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
