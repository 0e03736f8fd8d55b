"""Benchmark: scale-out on Dask against in-process, on synthetic months of 10M and 30M rides (2 cores).

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/scale.py [--sizes 10M 30M] [--worker-memory-gb 4]

Months are written by `tripcast data synth` (green 2021-01's rides resampled: synth-green 2021-01 of each size
for training and scoring, synth-green 2021-02 of 1M rides for validation). Each measurement runs in a fresh child
process; memory is the peak resident set (VmHWM) of each process that did the work: the child itself, and for
`local:2` each Dask worker (each limited to --worker-memory-gb, Dask's nanny kills a worker past it).

- training: data preparation (read, normalise, filter, features) + LightGBM (the default model with its pair
  statistics), in-process vs `local:2`: seconds, peak memory per process, validation RMSE; `finished` says
  whether it ended (a path that fails or is killed is reported so, with what it said);
- batch scoring of the 10M month: rows/s in-process vs `local:2`, and their ratio (`scoring_speedup`); and
  in-process with LightGBM on one thread (what each worker does), the reference of the cluster's scaling;
- monitoring: one week window of 10M logged predictions (all labelled) on PostgreSQL, computed in-process:
  seconds and peak memory (targets: <= 60 s, <= 2 GB); its drift figures on the 200k sample against those of
  the whole window (TRIPCAST_DRIFT_SAMPLE_ROWS above 10M).

The last line is JSON: `scoring_speedup`, `monitor_seconds`, `monitor_peak_mb`, `training` (per size and path,
with `finished`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

WEEK = (datetime(2021, 1, 11), datetime(2021, 1, 18))
PG = "postgresql://postgres@127.0.0.1:5432"


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _count(text: str) -> int:
    text = text.lower()
    return int(float(text[:-1]) * 1_000_000) if text.endswith("m") else int(text)


def _settings(mirror: Path, home: Path, **extra):
    from tripcast.config import load_settings

    return load_settings().with_overrides(home=home, tlc_mirror=str(mirror), progress=False, **extra)


# --- children ------------------------------------------------------------------------------------------------
def child_train(mirror: Path, home: Path, path: str, memory_gb: float) -> dict:
    from tripcast import features as feats
    from tripcast import training
    from tripcast.data import tlc
    from tripcast.metrics import regression_metrics
    from tripcast.models import TripDurationPipeline

    settings = _settings(mirror, home, dask_worker_memory_gb=memory_gb)
    month, val_month = tlc.Month(2021, 1), tlc.Month(2021, 2)
    validation = training.read_month_data("synth-green", val_month, settings)
    pre = feats.Preprocessor()
    val_x, val_y = pre.transform(validation.rides), feats.targets(validation.rides)
    workers: dict = {}
    started = time.perf_counter()
    if path == "in-process":
        data = training.prepare_months("synth-green", [month], [tlc.read_month("synth-green", month, settings)],
                                       settings)
        fit = training.fit_in_process(training.build_features(data, validation))("lightgbm", {})
    else:
        from tripcast.cluster import connect
        from tripcast.cluster.data import month_data
        from tripcast.cluster.training import fitter
        from tripcast.config import DaskTarget

        with connect(DaskTarget(None, 2), settings) as client:
            data = month_data(client, "synth-green", [month], settings)
            fit = fitter(client, data.rides, pre)("lightgbm", {})
            workers = client.run(_peak_mb)
    seconds = time.perf_counter() - started
    rmse = regression_metrics(val_y, TripDurationPipeline("lightgbm", fit.estimator, pre).predict_features(val_x))
    return {"finished": True, "seconds": round(seconds, 1), "fit_seconds": round(fit.seconds, 1),
            "rows": data.drops.rows_out, "val_rmse": round(rmse["rmse"], 4), "peak_mb": round(_peak_mb()),
            "worker_peak_mb": sorted(round(v) for v in workers.values())}


def child_score(mirror: Path, home: Path, path: str, memory_gb: float) -> dict:
    from tripcast import batch
    from tripcast.data import tlc
    from tripcast.models import TripDurationPipeline

    settings = _settings(mirror, home, dask_worker_memory_gb=memory_gb)
    pipeline = TripDurationPipeline.load(home / "pipeline")
    month = tlc.Month(2021, 1)
    tlc.fetch("synth-green", month, settings)
    workers: dict = {}
    started = time.perf_counter()
    if path.startswith("in-process"):
        if path == "in-process-1-thread":  # what each Dask worker does, as one process: the scaling's reference
            pipeline.estimator.threads = 1
        rides, _ = batch.scorable_month("synth-green", month, settings)
        scored = batch.score_rides(rides, pipeline, "1")
        batch.write_atomic(scored, batch.output_path("synth-green", month, settings))
        rows = len(scored)
    else:
        from tripcast.cluster import connect
        from tripcast.cluster.scoring import score_months
        from tripcast.config import DaskTarget

        with connect(DaskTarget(None, 2), settings) as client:
            started = time.perf_counter()  # the cluster's start-up is not scoring
            rows = score_months(client, "synth-green", [month], pipeline, "1", settings)[0]["rows"]
            workers = client.run(_peak_mb)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
            "peak_mb": round(_peak_mb()), "worker_peak_mb": sorted(round(v) for v in workers.values())}


def child_monitor(mirror: Path, home: Path, store: str, sample: int) -> dict:
    from tripcast.monitoring.windows import Window, compute_window, load_reference
    from tripcast.registry import Registry
    from tripcast.store import connect

    settings = _settings(mirror, home, monitoring_uri=store, drift_sample_rows=sample, reports_keep=0)
    registry = Registry(settings)
    import evidently.presets  # noqa: F401  (imports and the reference are not the window's work)

    load_reference(registry, "1", settings)
    before = _peak_mb()
    started = time.perf_counter()
    rows = compute_window(connect(store), registry, Window("week", *WEEK), settings)
    seconds = time.perf_counter() - started
    figures = {r["metric"]: r["value"] for r in rows}
    return {"seconds": round(seconds, 1), "peak_mb": round(_peak_mb()), "rss_before_mb": round(before),
            "figures": {k: v for k, v in figures.items() if k.startswith(("drift", "prediction", "od", "rmse", "rows",
                                                                          "labelled", "missing", "unknown"))}}


# --- the parent ----------------------------------------------------------------------------------------------
def _child(kind: str, *args: str, timeout: float = 3600) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"finished": False, "why": f"no result after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(nothing)"])[-1][:300]
        return {"finished": False, "exit": done.returncode, "seconds": round(time.perf_counter() - started, 1),
                "why": tail}
    return json.loads(lines[-1])


def _fill_store(store: str, home: Path, mirror: Path, rides: int) -> None:
    """A week of ``rides`` logged predictions of version 1, all labelled, written with COPY."""
    import io

    import numpy as np
    import pandas as pd
    import psycopg

    from tripcast import features as feats
    from tripcast.data import tlc
    from tripcast.models import TripDurationPipeline
    from tripcast.store import connect

    connect(store).dispose()  # the tables
    settings = _settings(mirror, home)
    pipeline = TripDurationPipeline.load(home / "pipeline")
    source = tlc.read_month("synth-green", tlc.Month(2021, 1), settings)
    source = source[(source["dropoff_datetime"] > source["pickup_datetime"])].reset_index(drop=True)
    rng = np.random.default_rng(1)
    span = (WEEK[1] - WEEK[0]).total_seconds()
    with psycopg.connect(store.replace("postgresql+psycopg", "postgresql")) as conn:
        for begin in range(0, rides, 1_000_000):
            n = min(1_000_000, rides - begin)
            part = source.iloc[rng.integers(0, len(source), n)].reset_index(drop=True)
            duration = feats.duration_minutes(part)
            # In time order, as a log is written (a log written in random order makes every slice of a window
            # read every page of the table: 184 s for this window instead of ~60).
            offsets = np.sort(begin + rng.random(n) * n) / rides * span
            part["pickup_datetime"] = pd.Timestamp(WEEK[0]) + pd.to_timedelta(offsets, unit="s")
            ids = "scale-" + pd.RangeIndex(begin, begin + n).astype(str)
            logged = pd.DataFrame({"ride_id": ids, "logged_at": WEEK[1], "pickup_datetime": part["pickup_datetime"],
                                   "PULocationID": part["PULocationID"], "DOLocationID": part["DOLocationID"],
                                   "trip_distance": part["trip_distance"], "prediction": pipeline.predict(part),
                                   "model_version": "1", "arm": "champion", "source": "batch"})
            labelled = pd.DataFrame({"ride_id": ids, "actual_duration": duration, "received_at": WEEK[1] +
                                     timedelta(days=1), "source": "month"})
            for table, frame in (("predictions", logged), ("labels", labelled)):
                buffer = io.StringIO()
                frame.to_csv(buffer, index=False, header=False)
                columns = ", ".join(f'"{c}"' for c in frame.columns)
                with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(buffer.getvalue())
            conn.commit()
            print(f"  store: {begin + n:,} of {rides:,} predictions", flush=True)
        conn.execute("ANALYZE predictions")
        conn.execute("ANALYZE labels")
        conn.commit()


def _champion(home: Path, mirror: Path) -> None:
    """Version 1 in a registry (its reference is monitoring's), trained on the real green 2021-01/02; and a
    LightGBM pipeline for scoring, saved under home."""
    from tripcast import training
    from tripcast.registry import Registry

    settings = _settings(Path(os.environ["TRIPCAST_TLC_MIRROR"]), home)
    months = [training.read_month_data("green", m, settings) for m in ("2021-01", "2021-02")]
    result = training.train(months[0], months[1], "lightgbm", settings)
    registry = Registry(settings)
    registry.promote(registry.register(result.model_uri, result.run_id).version)
    result.pipeline.save(home / "pipeline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "30M"])
    parser.add_argument("--worker-memory-gb", type=float, default=4.0)
    parser.add_argument("--monitor-rides", default="10M")
    parser.add_argument("--parts", nargs="+", default=["training", "monitoring"],
                        help="training (with scoring on the first size) and/or monitoring")
    parser.add_argument("--skip-whole", action="store_true", help="monitoring: the sampled window only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--args", nargs="*", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        mirror, home, *more = rest
        function = {"train": child_train, "score": child_score, "monitor": child_monitor}[args.child]
        typed = [float(m) if m.replace(".", "").isdigit() and "." in m else int(m) if m.isdigit() else m
                 for m in more]
        print(json.dumps(function(Path(mirror), Path(home), *typed)))
        return

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    gb = str(args.worker_memory_gb)
    results: dict = {"bench": "scale", "worker_memory_gb": args.worker_memory_gb, "training": {}}
    with tempfile.TemporaryDirectory(prefix="tripcast-scale-") as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["TRIPCAST_HOME"] = str(home)
        print("a champion on the real green 2021-01/02 (monitoring's reference, scoring's model) ...", flush=True)
        _champion(home, root)
        from tripcast.config import load_settings
        from tripcast.data import tlc
        from tripcast.data.synth import synthesize

        real = load_settings().with_overrides(home=home, progress=False)
        for size in args.sizes if "training" in args.parts else []:
            rides = _count(size)
            mirror = root / f"mirror-{size}"
            started = time.perf_counter()
            synthesize("green", tlc.Month(2021, 1), rides, mirror, real)
            synthesize("green", tlc.Month(2021, 1), 1_000_000, mirror, real, tlc.Month(2021, 2), seed=2)
            print(f"{size}: synthesized in {time.perf_counter() - started:.0f} s", flush=True)
            results["training"][size] = {}
            for path in ("in-process", "local:2"):
                work = root / f"work-{size}-{path.replace(':', '')}"
                r = _child("train", str(mirror), str(work), path, gb)
                results["training"][size][path] = r
                print(f"  train {path:>10}: {json.dumps(r)}", flush=True)
            if size == args.sizes[0]:
                for path in ("in-process", "in-process-1-thread", "local:2"):
                    work = root / f"score-{path.replace(':', '')}"
                    (work / "pipeline").parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(home / "pipeline", work / "pipeline")
                    r = _child("score", str(mirror), str(work), path, gb)
                    results[f"scoring_{path}"] = r
                    print(f"  score {path:>10}: {json.dumps(r)}", flush=True)
                local, cluster = results["scoring_in-process"], results["scoring_local:2"]
                if "rows_per_second" in local and "rows_per_second" in cluster:
                    results["scoring_speedup"] = round(cluster["rows_per_second"] / local["rows_per_second"], 2)
                    print(f"  scoring speedup local:2 / in-process: {results['scoring_speedup']}x (target >= 1.7)")
                one = results["scoring_in-process-1-thread"]
                if "rows_per_second" in one and "rows_per_second" in cluster:
                    results["scoring_speedup_vs_one_thread"] = round(
                        cluster["rows_per_second"] / one["rows_per_second"], 2)
                    print(f"  local:2 / in-process on one thread: {results['scoring_speedup_vs_one_thread']}x")
            for path in mirror.glob("*"):
                path.unlink()
        if "monitoring" in args.parts:
            results |= monitoring(root, home, real, _count(args.monitor_rides), not args.skip_whole)
    print(json.dumps(results))


def monitoring(root: Path, home: Path, real, monitor_rides: int, whole_too: bool = True) -> dict:
    """One week of ``monitor_rides`` logged predictions on PostgreSQL, measured sampled and whole."""
    import psycopg

    from tripcast.data import tlc
    from tripcast.data.synth import synthesize

    results: dict = {}
    database = "tripcast_bench_scale"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {database}")
    store = f"{PG}/{database}"
    mirror = root / "mirror-monitor"
    synthesize("green", tlc.Month(2021, 1), 2_000_000, mirror, real)
    print(f"a store of {monitor_rides:,} logged predictions in one week ...", flush=True)
    started = time.perf_counter()
    _fill_store(store, home, mirror, monitor_rides)
    print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)
    sampled = _child("monitor", str(mirror), str(home), store, "200000")
    print(f"  monitor, 200k sample: {json.dumps(sampled)}", flush=True)
    whole = _child("monitor", str(mirror), str(home), store, str(monitor_rides + 1)) if whole_too else {}
    print(f"  monitor, whole window: {json.dumps(whole)}", flush=True)
    results["monitor_sampled"], results["monitor_whole"] = sampled, whole
    results["monitor_seconds"] = sampled.get("seconds")
    results["monitor_peak_mb"] = sampled.get("peak_mb")
    if "figures" in sampled and "figures" in whole:
        results["drift_sample_vs_whole"] = {
            k: [round(sampled["figures"][k], 4), round(whole["figures"].get(k, float("nan")), 4)]
            for k in sampled["figures"] if k.startswith(("drift_", "prediction_drift", "od_drift"))
            and k != "drift_sample_rows"}
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    return results


if __name__ == "__main__":
    main()
