"""Benchmark: time and peak memory to compute one monitoring window of 10k, 100k and 1M predictions.

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/monitor.py [--sizes 10000 100000 1000000]

A champion is trained on green 2021-01 (validated on 2021-02: its reference). For each size, a prediction
log holding that many predictions in one week (rides of the week of 2021-03-08, drawn with replacement,
all labelled) is written to a fresh SQLite store, and then, in a fresh process, one window is computed the
way the monitoring flow does it: read and join the log, Evidently drift report (+ HTML), zone-pair drift,
quality, accuracy, store the figures. Prints seconds, rows/s and the peak memory the computation added
(peak RSS during it minus RSS before it), and ends with one JSON line. Target: 100k predictions in <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

WEEK = (datetime(2021, 3, 8), datetime(2021, 3, 15))


def prepare(home: Path, sizes: list[int]) -> None:
    import numpy as np
    import pandas as pd

    from tripcast import training
    from tripcast.batch import scorable_month
    from tripcast.config import load_settings
    from tripcast.data import tlc
    from tripcast.registry import CHAMPION, Registry, decide
    from tripcast.store import connect, labels, predictions

    settings = load_settings()
    months = [training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02")]
    result = training.train(months[0], months[1], "lightgbm", settings)
    registry = Registry(settings)
    version = registry.register(result.model_uri, result.run_id).version
    registry.apply(version, decide(result.val_rmse, None, result.baseline_rmse, settings.promotion_margin))
    _, pipeline = registry.load_pipeline(CHAMPION)
    rides, _ = scorable_month("green", tlc.Month.parse("2021-03"), settings)
    rides = rides[(rides["pickup_datetime"] >= WEEK[0]) & (rides["pickup_datetime"] < WEEK[1])]
    rng = np.random.default_rng(0)
    for size in sizes:
        drawn = rides.iloc[rng.integers(0, len(rides), size)].reset_index(drop=True)
        ids = [f"bench-{i}" for i in range(size)]
        frame = pd.DataFrame({"ride_id": ids, "logged_at": datetime(2021, 3, 15), "pickup_datetime":
                              drawn["pickup_datetime"], "PULocationID": drawn["PULocationID"],
                              "DOLocationID": drawn["DOLocationID"], "trip_distance": drawn["trip_distance"],
                              "prediction": pipeline.predict(drawn), "model_version": str(version),
                              "arm": "champion", "source": "batch"})
        engine = connect(f"sqlite:///{home / f'monitoring-{size}.db'}")
        with engine.begin() as conn:
            frame.to_sql("predictions", conn, if_exists="append", index=False, chunksize=50_000)
            pd.DataFrame({"ride_id": ids, "actual_duration": training.feats.duration_minutes(drawn),
                          "received_at": datetime(2021, 3, 20), "source": "month"}).to_sql(
                "labels", conn, if_exists="append", index=False, chunksize=50_000)
        engine.dispose()
        assert predictions is not None and labels is not None  # the tables the store defines


def measure(home: Path, size: int) -> dict:
    """One window, timed, in this (fresh) process."""
    from tripcast.config import load_settings
    from tripcast.monitoring.windows import Window, compute_window, load_reference
    from tripcast.registry import Registry
    from tripcast.store import connect

    settings = load_settings().with_overrides(monitoring_uri=f"sqlite:///{home / f'monitoring-{size}.db'}")
    registry = Registry(settings)
    engine = connect(settings.resolved_monitoring_uri)
    window = Window("week", *WEEK)
    # Warm: imports (Evidently's alone take ~1.5 s and ~300 MB) and the model's reference, cached on disk.
    import evidently.presets  # noqa: F401

    load_reference(registry, "1", settings)
    rss_before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    rows = compute_window(engine, registry, window, settings)
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    figures = {r["metric"]: r["value"] for r in rows}
    return {"rows": int(figures["rows"]), "seconds": round(seconds, 2), "rows_per_s": round(size / seconds),
            "peak_added_mb": round(max(0.0, peak - rss_before)), "drift_share": figures["drift_share"],
            "rmse": round(figures["rmse"], 3)}


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: one size, in a child
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.home), args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ.update({"TRIPCAST_HOME": str(home), "TRIPCAST_PROGRESS": "false",
                           "MLFLOW_LOGGING_LEVEL": "WARNING"})
        print(f"preparing a champion and logs of {', '.join(f'{s:,}' for s in args.sizes)} predictions ...",
              flush=True)
        prepare(home, args.sizes)
        results = {}
        for size in args.sizes:
            child = subprocess.run([sys.executable, __file__, "--measure", str(size), "--home", str(home)],
                                   capture_output=True, text=True, check=True)
            results[size] = json.loads(child.stdout.strip().splitlines()[-1])
            r = results[size]
            print(f"{size:>9,} predictions: {r['seconds']:6.2f} s  {r['rows_per_s']:>9,} rows/s  "
                  f"peak +{r['peak_added_mb']:,} MB  (drift share {r['drift_share']:.2f}, RMSE {r['rmse']})",
                  flush=True)
        target = results.get(100_000)
        if target:
            print(f"100k window: {target['seconds']:.2f} s (target <= 10 s)")
        print(json.dumps({"bench": "monitor", "windows": {str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
