"""The default model and the rule baseline fitted on a Dask cluster, into the same plain models as in-process.

LightGBM's own ``lightgbm.dask`` grows the trees (data-parallel, one LightGBM process per worker); the zone-pair
statistics come from Dask groupbys of per-fold sums, out of fold as in-process (each partition draws its rides'
folds from its own seeded stream, so the folds differ from in-process ones, not their role); the baseline's
medians from Dask groupbys. The result is a ``LightGBMDuration`` / ``ZonePairMedian`` like any other: logged,
registered and served without Dask.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from tripcast import features as feats
from tripcast.cluster import TRAINED_ON_A_CLUSTER, ClusterError, WorkerLost
from tripcast.models import TripDurationPipeline
from tripcast.models.baseline import ZonePairMedian, distance_bin
from tripcast.models.boosted import (
    CATEGORICAL,
    DEFAULT_PARAMS,
    FEATURES,
    FOLDS,
    RIDE_FEATURES,
    LightGBMDuration,
    PairStatistics,
    log_pace,
)
from tripcast.training import Fit, Fitter, MonthData


def model_input(rides: pd.DataFrame, pre: feats.Preprocessor) -> pd.DataFrame:
    """The preprocessor's features and the target of a partition of cleaned rides."""
    frame = pre.transform(rides)
    frame[feats.TARGET] = feats.targets(rides)
    return frame


def with_folds(rides: pd.DataFrame, pre: feats.Preprocessor, seed: int,
               partition_info: dict | None = None) -> pd.DataFrame:
    """A partition's model input, its target, its rides' out-of-fold folds and their log paces."""
    part = model_input(rides, pre)
    number = partition_info["number"] if partition_info else 0
    fold = np.random.default_rng([seed, number]).integers(0, FOLDS, len(part))
    target = part[feats.TARGET].to_numpy()
    return part.assign(fold=fold.astype(np.int8), log_pace=log_pace(target, part["trip_distance"].to_numpy()))


def _encode_out_of_fold(part: pd.DataFrame, by_fold: list[PairStatistics]) -> pd.DataFrame:
    minutes, log_pace = np.empty(len(part)), np.empty(len(part))
    fold = part["fold"].to_numpy()
    for k, stats in enumerate(by_fold):
        held = fold == k
        minutes[held], log_pace[held] = stats.encode({c: part[c].to_numpy()[held]
                                                      for c in ("zone_pair", "PULocationID")})
    return part.assign(pair_minutes=minutes, pair_log_pace=log_pace)


def _squared_errors(part: pd.DataFrame, pipeline: TripDurationPipeline) -> pd.DataFrame:
    actual = part[feats.TARGET].to_numpy()
    error = actual - pipeline.predict_features(part)
    return pd.DataFrame({"n": [len(part)], "y": [actual.sum()], "y2": [(actual**2).sum()],
                         "se": [(error**2).sum()], "ae": [np.abs(error).sum()]})


def accuracy(inputs: Any, pipeline: TripDurationPipeline) -> dict[str, float]:
    """RMSE, MAE and R² of a pipeline over a Dask frame of model input, from per-partition sums."""
    meta = pd.DataFrame({c: pd.Series(dtype=float) for c in ("n", "y", "y2", "se", "ae")})
    total = inputs.map_partitions(_squared_errors, pipeline, meta=meta).sum().compute()
    n = float(total["n"])
    return {"rmse": float(np.sqrt(total["se"] / n)), "mae": float(total["ae"] / n),
            "r2": float(1 - total["se"] / (total["y2"] - total["y"] ** 2 / n))}


def fit_lightgbm(client: Client, inputs: Any, seed: int = 42, **params: Any) -> LightGBMDuration:
    """LightGBM on ``inputs`` (``with_folds``' lazy frame): the per-fold sums of one pass, then the training matrix
    of a second, the only thing the workers hold while LightGBM trains."""
    import dask
    import lightgbm
    from distributed import wait
    from lightgbm.dask import DaskLGBMRegressor

    lightgbm.register_logger(logging.getLogger("lightgbm"))  # its notes ("Finding random open ports") as logs
    hyper = DEFAULT_PARAMS | params
    booster_params = {k: v for k, v in hyper.items() if k not in ("n_estimators", "pair_statistics", "pair_smoothing")}
    if not hyper["pair_statistics"]:
        raise ClusterError("lightgbm without pair statistics trains in-process only")
    smoothing = float(hyper["pair_smoothing"])
    sums = (inputs.groupby(["fold", "zone_pair"])
            .agg({feats.TARGET: ["sum", "count"], "log_pace": "sum"}).compute())
    sums.columns = ["minutes", "rides", "log_pace"]
    total = sums.groupby(level="zone_pair").sum()
    by_fold = [PairStatistics.from_sums(total.sub(sums.xs(k, level="fold"), fill_value=0), smoothing)
               for k in range(FOLDS)]
    encoded = inputs.map_partitions(_encode_out_of_fold, by_fold, meta=inputs._meta.assign(
        pair_minutes=0.0, pair_log_pace=0.0))
    # float32: LightGBM copies a worker's parts into one matrix, so the matrix is held twice while it bins it; in
    # float64, a month of 30M rides did not fit two workers of 4 GB. Zones, hours and days are exact in float32,
    # distances (hundredths of a mile) and the pair statistics move by less than a part in ten million.
    matrix = encoded[RIDE_FEATURES + ["pair_minutes", "pair_log_pace"]].astype(np.float32)
    matrix.columns = FEATURES
    matrix, target = dask.persist(matrix, encoded[feats.TARGET])
    wait([matrix, target])
    # time_out (minutes, per network operation): a worker lost mid-training leaves the others waiting on it for
    # LightGBM's default two hours.
    regressor = DaskLGBMRegressor(client=client, objective="regression", n_estimators=int(hyper["n_estimators"]),
                                  random_state=seed, deterministic=True, verbosity=-1, time_out=3, **booster_params)

    def fit() -> None:
        with warnings.catch_warnings():  # it drops n_jobs (a worker's threads decide): said at every fit
            warnings.filterwarnings("ignore", "Parameter .* will be ignored")
            regressor.fit(matrix, target, feature_name=FEATURES, categorical_feature=CATEGORICAL)

    _while_no_worker_is_lost(client, fit)
    return LightGBMDuration.from_booster(regressor.booster_, PairStatistics.from_sums(total, smoothing), seed,
                                         **params)


def _while_no_worker_is_lost(client: Client, fit: Callable[[], None]) -> None:
    """``fit`` (lightgbm.dask's training), failed if a worker is lost meanwhile: its tasks are pinned to the
    workers they began on, so one lost (restarted out of memory, under a new address) left the training waiting
    for ever (seen: a 0.5 GB local worker, a run stopped after 600 s)."""
    workers = set(client.scheduler_info()["workers"])
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fit()
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="lightgbm-dask-fit", daemon=True)  # left behind if a worker is lost
    thread.start()
    while thread.is_alive():
        thread.join(1)
        if thread.is_alive() and not workers <= set(client.scheduler_info()["workers"]):
            raise WorkerLost("lightgbm_training")
    if failed:
        raise failed[0]


def fit_baseline(inputs: Any) -> ZonePairMedian:
    frame = inputs[["zone_pair", feats.TARGET]].assign(
        bin=inputs["trip_distance"].map_partitions(lambda d: pd.Series(distance_bin(d.to_numpy()), index=d.index),
                                                   meta=("bin", np.int64)))
    grouped = frame.groupby("zone_pair")[feats.TARGET]
    by_pair = pd.DataFrame({"size": grouped.size().compute(), "median": grouped.median().compute()})
    by_bin = frame.groupby("bin")[feats.TARGET].median().compute()
    overall = float(frame[feats.TARGET].quantile(0.5).compute())
    return ZonePairMedian().set_medians(by_pair, by_bin, overall)


def check_trainable(model: str) -> None:
    if model not in TRAINED_ON_A_CLUSTER:
        raise ClusterError(f"model {model!r} trains in-process only")


def evaluate(data: MonthData, pipeline: TripDurationPipeline) -> dict[str, float]:
    """``training.evaluate`` for months read on the cluster."""
    inputs = data.rides.map_partitions(model_input, pipeline.preprocessor,
                                       meta=model_input(data.rides._meta, pipeline.preprocessor))
    return accuracy(inputs, pipeline) | {"rows": data.drops.rows_out}


def fitter(client: Client, rides: Any, pre: feats.Preprocessor) -> Fitter:
    """``training.train``'s ``fit`` on the cluster, for a Dask frame of cleaned training rides."""
    def fit(model: str, params: dict[str, Any]) -> Fit:
        check_trainable(model)
        seed = int(params.get("seed", 42))
        # Lazy: each use reads the pieces again (cheap beside LightGBM), so the workers' memory holds one thing
        # at a time.
        inputs = rides.map_partitions(with_folds, pre, seed, meta=with_folds(rides._meta, pre, seed))
        started = time.perf_counter()
        estimator = fit_lightgbm(client, inputs, **params) if model == "lightgbm" else fit_baseline(inputs)
        seconds = time.perf_counter() - started
        baseline = estimator if model == "baseline" else fit_baseline(inputs)
        train = accuracy(inputs, TripDurationPipeline(model, estimator, pre))
        return Fit(estimator, baseline, train, seconds)
    return fit

