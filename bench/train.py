"""Benchmark: the course's linear model (zone pair + distance) on every green month but the last, evaluated on
the last; tripcast's path vs a straightforward pandas + DictVectorizer + LinearRegression implementation.

Each implementation runs in its own process (so peak memory is its own), reading the same local files: the
mirror for the reference, tripcast's cache (filled from the mirror before timing) for tripcast. Two times:
- pipeline: read -> filter -> features -> fit -> evaluate, with each side's libraries already imported (as in
  a worker process that trains repeatedly); this is the figure the target applies to;
- cold: the whole process as the parent sees it (interpreter start and imports included; sklearn's import
  alone costs both sides ~0.8 s here).

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/train.py [--repeat 3]

Prints both times, both RMSEs, peak memory, the speed ratio, and ends with one JSON line.
Target: tripcast >= 5x faster end to end, RMSE equal within 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def green_months(mirror: Path) -> list[str]:
    months = sorted(m.group(1) for p in mirror.glob("green_tripdata_*.parquet")
                    if (m := re.match(r"green_tripdata_(\d{4}-\d{2})\.parquet", p.name)))
    if len(months) < 2:
        sys.exit(f"need at least two green months in {mirror}")
    return months


def import_reference() -> None:
    import pandas  # noqa: F401
    import sklearn.feature_extraction  # noqa: F401
    import sklearn.linear_model  # noqa: F401


def run_reference(mirror: Path, train: list[str], val: str) -> float:
    """The course's code, as written in its notebooks."""
    import numpy as np
    import pandas as pd
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LinearRegression

    def read_dataframe(month: str) -> pd.DataFrame:
        df = pd.read_parquet(mirror / f"green_tripdata_{month}.parquet")
        df["duration"] = df.lpep_dropoff_datetime - df.lpep_pickup_datetime
        df.duration = df.duration.apply(lambda td: td.total_seconds() / 60)
        df = df[(df.duration >= 1) & (df.duration <= 60)]
        df[["PULocationID", "DOLocationID"]] = df[["PULocationID", "DOLocationID"]].astype(str)
        df["PU_DO"] = df["PULocationID"] + "_" + df["DOLocationID"]
        return df

    df_train = pd.concat([read_dataframe(m) for m in train], ignore_index=True)
    df_val = read_dataframe(val)
    columns = ["PU_DO", "trip_distance"]
    dv = DictVectorizer()
    x_train = dv.fit_transform(df_train[columns].to_dict(orient="records"))
    x_val = dv.transform(df_val[columns].to_dict(orient="records"))
    model = LinearRegression().fit(x_train, df_train["duration"].values)
    return float(np.sqrt(np.mean((model.predict(x_val) - df_val["duration"].values) ** 2)))


def import_tripcast() -> None:
    import sklearn.linear_model  # noqa: F401

    import tripcast.data.tlc  # noqa: F401
    import tripcast.metrics  # noqa: F401
    import tripcast.models.linear  # noqa: F401


def run_tripcast(home: Path, mirror: Path, train: list[str], val: str) -> float:
    from tripcast import features as feats
    from tripcast.config import Settings
    from tripcast.data import tlc
    from tripcast.metrics import regression_metrics
    from tripcast.models import build

    settings = Settings(home=home, tlc_mirror=str(mirror), progress=False)
    # The reference's filters (duration only): no per-month pickup window, no distance cap.
    train_rides, _ = feats.clean(tlc.read_months("green", [tlc.Month.parse(m) for m in train], settings))
    val_rides, _ = feats.clean(tlc.read_month("green", val, settings))
    pre = feats.Preprocessor()
    model = build("linear").fit(pre.transform(train_rides), feats.targets(train_rides))
    return regression_metrics(feats.targets(val_rides), model.predict(pre.transform(val_rides)))["rmse"]


def child(args: argparse.Namespace) -> None:
    mirror = Path(args.mirror)
    months = green_months(mirror)
    import_reference() if args.impl == "reference" else import_tripcast()
    started = time.perf_counter()
    if args.impl == "reference":
        rmse = run_reference(mirror, months[:-1], months[-1])
    else:
        rmse = run_tripcast(Path(args.home), mirror, months[:-1], months[-1])
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rmse": rmse, "peak_mb": peak_mb}))


def measure(impl: str, mirror: Path, home: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", impl, "--mirror", str(mirror), "--home", str(home)],
                         capture_output=True, text=True, check=True)
    cold = time.perf_counter() - started
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"cold_seconds": cold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation; the best time counts")
    parser.add_argument("--mirror", default=os.environ.get("TRIPCAST_TLC_MIRROR", "../shared/data/tlc"))
    parser.add_argument("--child", dest="impl", choices=["reference", "tripcast"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    mirror = Path(args.mirror).resolve()
    months = green_months(mirror)
    print(f"linear (zone pair + distance): train on {len(months) - 1} green months {months[0]}..{months[-2]}, "
          f"evaluate on {months[-1]}")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        from tripcast.config import Settings
        from tripcast.data import tlc

        warm = Settings(home=home, tlc_mirror=str(mirror), progress=False)
        for month in months:  # fill tripcast's cache first: the benchmark times training, not copying
            tlc.fetch("green", month, warm)
        results: dict[str, list[dict]] = {"reference": [], "tripcast": []}
        for i in range(args.repeat):
            for impl in results:
                results[impl].append(measure(impl, mirror, home))
                r = results[impl][-1]
                print(f"  run {i + 1} {impl:9s} pipeline {r['seconds']:5.2f} s  cold {r['cold_seconds']:5.2f} s  "
                      f"RMSE {r['rmse']:.4f}  peak {r['peak_mb']:.0f} MB", flush=True)
    best = {impl: min(runs, key=lambda r: r["seconds"]) for impl, runs in results.items()}
    ref, ours = best["reference"], best["tripcast"]
    ratio = ref["seconds"] / ours["seconds"]
    cold = {impl: min(r["cold_seconds"] for r in runs) for impl, runs in results.items()}
    cold_ratio = cold["reference"] / cold["tripcast"]
    for name, r in (("reference", ref), ("tripcast", ours)):
        print(f"{name:9s}: pipeline {r['seconds']:.2f} s, cold process {r['cold_seconds']:.2f} s, "
              f"RMSE {r['rmse']:.4f}, peak {r['peak_mb']:.0f} MB")
    print(f"speed-up {ratio:.1f}x pipeline (target >= 5x), {cold_ratio:.1f}x cold process; "
          f"RMSE difference {abs(ref['rmse'] - ours['rmse']):.4f} (target <= 0.01); "
          f"peak memory {ours['peak_mb'] / ref['peak_mb']:.2f}x")
    print(json.dumps({"benchmark": "train", "train_months": months[:-1], "val_month": months[-1],
                      "reference_seconds": round(ref["seconds"], 3), "tripcast_seconds": round(ours["seconds"], 3),
                      "speedup": round(ratio, 2), "cold_speedup": round(cold_ratio, 2),
                      "reference_cold_seconds": round(ref["cold_seconds"], 3),
                      "tripcast_cold_seconds": round(ours["cold_seconds"], 3), "reference_rmse": round(ref["rmse"], 4),
                      "tripcast_rmse": round(ours["rmse"], 4),
                      "rmse_diff": round(abs(ref["rmse"] - ours["rmse"]), 4),
                      "reference_peak_mb": round(ref["peak_mb"]), "tripcast_peak_mb": round(ours["peak_mb"])}))


if __name__ == "__main__":
    main()
