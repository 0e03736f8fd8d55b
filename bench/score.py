"""Benchmark: batch scoring of a month by tripcast vs the same registered model through mlflow.pyfunc.

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/score.py [--month 2021-03] [--repeat 3]

Both score the same rides (green, every scorable ride of the month) with the same registered champion:
tripcast's path is what `tripcast score` runs (registry pipeline, its preprocessor, the estimator);
the reference loads the model with `mlflow.pyfunc.load_model` and calls `predict` on the pandas frame.
Prints rows/s for each, the ratio (target >= 5x), whether predictions are identical, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--month", default="2021-03")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"TRIPCAST_HOME": str(Path(tmp) / "home"), "TRIPCAST_PROGRESS": "false",
                           "MLFLOW_LOGGING_LEVEL": "WARNING"})
        import mlflow
        import numpy as np

        from tripcast import batch, training
        from tripcast.config import load_settings
        from tripcast.data import tlc
        from tripcast.registry import CHAMPION, Registry

        settings = load_settings()
        months = [training.read_month_data("green", m, settings)
                  for m in ("2021-01", "2021-02")]
        result = training.train(months[0], months[1], "lightgbm", settings)
        registry = Registry(settings)
        registry.promote(registry.register(result.model_uri, result.run_id).version, reason="benchmark")
        month = tlc.Month.parse(args.month)
        rides, _ = batch.scorable_month("green", month, settings)
        frame = rides[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]].astype(
            {"PULocationID": "int64", "DOLocationID": "int64"})

        load_ours, (mv, pipeline) = best_of(1, lambda: registry.load_pipeline(CHAMPION))
        ours_s, ours = best_of(args.repeat, lambda: batch.score_rides(rides, pipeline, str(mv.version)))
        load_ref, model = best_of(1, lambda: mlflow.pyfunc.load_model(f"models:/{settings.model_name}@{CHAMPION}"))
        ref_s, reference = best_of(args.repeat, lambda: model.predict(frame))
    n = len(rides)
    same = bool(np.array_equal(ours["predicted_duration"].to_numpy(), np.asarray(reference)))
    ratio = (n / ours_s) / (n / ref_s)
    print(f"green {month}: {n:,} rides, version {mv.version}")
    print(f"tripcast (registry pipeline): {n / ours_s:10,.0f} rows/s ({ours_s:.3f} s; model load {load_ours:.2f} s)")
    print(f"mlflow.pyfunc predict:        {n / ref_s:10,.0f} rows/s ({ref_s:.3f} s; model load {load_ref:.2f} s)")
    print(f"ratio {ratio:.2f}x (target >= 5x); identical predictions: {same}")
    print(json.dumps({"benchmark": "score", "month": str(month), "rows": n, "tripcast_rows_per_s": round(n / ours_s),
                      "pyfunc_rows_per_s": round(n / ref_s), "ratio": round(ratio, 2), "identical": same,
                      "tripcast_load_s": round(load_ours, 2), "pyfunc_load_s": round(load_ref, 2)}))


if __name__ == "__main__":
    main()
