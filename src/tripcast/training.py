"""Fit, evaluate and log to MLflow: one run per model, with its rule baseline measured beside it.

Each run records parameters, RMSE/MAE/R² on train and validation, the rule baseline's RMSE on the same
validation rows, row and drop counts, the datasets (source address, month, file digest), the git commit,
two plots, the validation reference for monitoring, and the model (pyfunc, with signature and example).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.metrics import regression_metrics
from tripcast.models import FAMILIES, TripDurationPipeline, build, verify
from tripcast.models.base import DurationModel
from tripcast.models.tuning import suggest_params
from tripcast.tracking import configure, source_tags

log = logging.getLogger(__name__)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What a ride request carries; a missing pickup time means "now" (see Preprocessor).
INPUT_SCHEMA = Schema([
    ColSpec("long", "PULocationID"),
    ColSpec("long", "DOLocationID"),
    ColSpec("double", "trip_distance"),
    ColSpec("datetime", "pickup_datetime", required=False),
])


@dataclass
class MonthData:
    """A cleaned month (or, for retraining from the prediction log, a period) and where it came from."""

    color: str
    month: tlc.Month | str
    source: str
    digest: str
    rides: pd.DataFrame  # read on a Dask cluster (tripcast.cluster.data), a lazy Dask frame of them
    drops: feats.DropReport
    start: datetime  # the rides' pickups are in [start, end)
    end: datetime
    # Every ride a model could be asked about (valid inputs, any duration): the monitoring reference. The
    # duration filter selects on the target, so ``rides`` alone under-represents long trips in traffic.
    inputs: pd.DataFrame | None = None

    @property
    def label(self) -> str:
        return f"{self.color}_tripdata_{self.month}"


def prepare_month(color: str, month: str | tlc.Month, raw: pd.DataFrame, settings: Settings) -> MonthData:
    """Validate a raw month: apply the filters and keep their drop counts."""
    month = tlc.Month.parse(month)
    rides, drops = feats.clean(raw, settings.min_duration, settings.max_duration, month.start, month.end,
                               settings.max_distance)
    inputs, _ = feats.clean(raw, -np.inf, np.inf, month.start, month.end, settings.max_distance)
    path = tlc.cache_path(color, month, settings)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""
    return MonthData(color, month, tlc.source_address(color, month, settings), digest, rides, drops,
                     month.start.to_pydatetime(), month.end.to_pydatetime(), inputs)


def prepare_months(color: str, months: list[tlc.Month], raws: list[pd.DataFrame], settings: Settings) -> MonthData:
    """Several months, each validated as a month (its own pickup bounds), as one period."""
    parts = [prepare_month(color, month, raw, settings) for month, raw in zip(months, raws, strict=True)]
    if len(parts) == 1:
        return parts[0]
    digest = hashlib.sha256("".join(p.digest for p in parts).encode()).hexdigest()[:16]
    return MonthData(color, tlc.month_label(months), " ".join(p.source for p in parts), digest,
                     pd.concat([p.rides for p in parts], ignore_index=True), sum((p.drops for p in parts[1:]),
                                                                                 parts[0].drops),
                     parts[0].start, parts[-1].end, pd.concat([p.inputs for p in parts], ignore_index=True))


def prepare_period(rides: pd.DataFrame, start: datetime, end: datetime, source: str,
                   settings: Settings) -> MonthData:
    """Labelled rides from the prediction log (canonical columns plus ``duration``), filtered like a month."""
    clean, drops = feats.clean(rides, settings.min_duration, settings.max_duration, pd.Timestamp(start),
                               pd.Timestamp(end), settings.max_distance)
    inputs, _ = feats.clean(rides, -np.inf, np.inf, pd.Timestamp(start), pd.Timestamp(end), settings.max_distance)
    return MonthData("served", f"{start:%Y-%m-%d}..{end:%Y-%m-%d}", source, "", clean, drops, start, end, inputs)


def read_month_data(color: str, month: str | tlc.Month, settings: Settings) -> MonthData:
    """Read (fetching if needed) and validate a month in one call; the flow keeps the two steps apart."""
    return prepare_month(color, month, tlc.read_month(color, month, settings), settings)


@dataclass
class FeatureSet:
    """Model input for the training and validation months, from the one preprocessor."""

    preprocessor: feats.Preprocessor
    train_x: pd.DataFrame
    train_y: np.ndarray
    val_x: pd.DataFrame
    val_y: np.ndarray


def build_features(train_data: MonthData, val_data: MonthData) -> FeatureSet:
    pre = feats.Preprocessor()
    return FeatureSet(pre, pre.transform(train_data.rides), feats.targets(train_data.rides),
                      pre.transform(val_data.rides), feats.targets(val_data.rides))


@dataclass
class Fit:
    """A fitted model, its rule baseline fitted on the same rides, and its accuracy on them: made in this
    process (``fit_in_process``) or on a Dask cluster (tripcast.cluster.training)."""

    estimator: DurationModel
    baseline: DurationModel
    train_metrics: dict[str, float]
    seconds: float


# (model, hyper-parameters) -> Fit, for ``train``'s ``fit``.
Fitter = Callable[[str, dict[str, Any]], Fit]


def fit_in_process(fs: FeatureSet) -> Fitter:
    def fit(model: str, params: dict[str, Any]) -> Fit:
        started = time.perf_counter()
        estimator = build(model, **params).fit(fs.train_x, fs.train_y)
        seconds = time.perf_counter() - started
        train_pred = TripDurationPipeline(model, estimator, fs.preprocessor).predict_features(fs.train_x)
        return Fit(estimator, build("baseline").fit(fs.train_x, fs.train_y),
                   regression_metrics(fs.train_y, train_pred), seconds)
    return fit


def validation_features(val_data: MonthData) -> FeatureSet:
    """The validation month's alone, for a ``train`` whose ``fit`` has the training rides elsewhere (a cluster)."""
    pre = feats.Preprocessor()
    return FeatureSet(pre, pd.DataFrame(), np.empty(0), pre.transform(val_data.rides), feats.targets(val_data.rides))


@dataclass
class TrainingResult:
    run_id: str
    model_uri: str
    model: str
    params: dict[str, Any]
    metrics: dict[str, float]
    pipeline: TripDurationPipeline
    train_period: tuple[datetime, datetime]
    baseline: DurationModel = field(repr=False)  # the rule, fitted on the same training rides
    val_predictions: np.ndarray = field(repr=False)
    val_baseline_predictions: np.ndarray = field(repr=False)  # the rule's, on the same validation rows

    @property
    def val_rmse(self) -> float:
        return self.metrics["val_rmse"]

    @property
    def baseline_rmse(self) -> float:
        return self.metrics["baseline_val_rmse"]


def tune(model: str, train: MonthData, trials: int, timeout: float | None, seed: int = 42) -> dict[str, Any]:
    """Optuna search on the training month alone: its last fifth (by pickup time) is the hold-out, so the
    validation month stays unseen until the final evaluation. Each trial is a nested MLflow run."""
    rides = train.rides.sort_values("pickup_datetime", kind="stable")
    cut = int(len(rides) * 0.8)
    pre = feats.Preprocessor()
    fit_x, hold_x = pre.transform(rides.iloc[:cut]), pre.transform(rides.iloc[cut:])
    fit_y, hold_y = feats.targets(rides.iloc[:cut]), feats.targets(rides.iloc[cut:])

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, model)
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params(params)
            rmse = regression_metrics(hold_y, build(model, **params).fit(fit_x, fit_y).predict(hold_x))["rmse"]
            mlflow.log_metric("holdout_rmse", rmse)
        return rmse

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, timeout=timeout, show_progress_bar=True)
    mlflow.log_metric("tuning_best_holdout_rmse", study.best_value)
    mlflow.log_param("tuning_trials_done", len(study.trials))
    return study.best_params


def _plots(actual: np.ndarray, predicted: np.ndarray, title: str) -> dict[str, plt.Figure]:
    rng = np.random.default_rng(0)
    sample = rng.choice(len(actual), size=min(len(actual), 20_000), replace=False)
    a, p = actual[sample], predicted[sample]
    residual_fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(p, a - p, s=2, alpha=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="predicted minutes", ylabel="actual - predicted", title=f"residuals: {title}")
    scatter_fig, ax = plt.subplots(figsize=(5, 5))
    ax.hexbin(a, p, gridsize=60, mincnt=1, bins="log")
    ax.plot([0, 60], [0, 60], color="red", linewidth=0.8)
    ax.set(xlabel="actual minutes", ylabel="predicted minutes", title=f"predicted vs actual: {title}")
    return {"plots/residuals.png": residual_fig, "plots/predicted_vs_actual.png": scatter_fig}


def _log_dataset(data: MonthData, context: str) -> None:
    # MLflow warns that a local path matches two source types (either is right) and that integer columns
    # cannot hold missing values (zone IDs never are missing after validation).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            dataset = mlflow.data.from_pandas(data.rides.head(1000), source=data.source, name=data.label,
                                              targets=feats.TARGET, digest=data.digest or None)
        except MlflowException:  # a database MLflow cannot resolve: named in the tags
            dataset = mlflow.data.from_pandas(data.rides.head(1000), name=data.label, targets=feats.TARGET)
        mlflow.log_input(dataset, context=context, tags={"month": str(data.month), "rows": str(data.drops.rows_out),
                                                         "source": data.source})


def train(
    train_data: MonthData,
    val_data: MonthData,
    model: str,
    settings: Settings,
    trials: int = 0,
    timeout: float | None = None,
    params: dict[str, Any] | None = None,
    features: FeatureSet | None = None,
    fit: Fitter | None = None,
) -> TrainingResult:
    """Fit ``model`` on the training month (in this process, or by ``fit``: then ``features`` holds the validation
    month's alone), evaluate on the validation month, log everything to MLflow."""
    if model not in FAMILIES:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(FAMILIES)}")
    configure(settings)
    fs = features or build_features(train_data, val_data)
    pre, val_x, val_y = fs.preprocessor, fs.val_x, fs.val_y
    run_name = f"{model} {train_data.color} {train_data.month}->{val_data.month}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(source_tags() | {
            "tripcast.model": model, "tripcast.color": train_data.color,
            "tripcast.train_month": str(train_data.month), "tripcast.val_month": str(val_data.month),
            "tripcast.train_start": train_data.start.isoformat(), "tripcast.train_end": train_data.end.isoformat(),
        })
        _log_dataset(train_data, "training")
        _log_dataset(val_data, "validation")
        mlflow.log_metrics(train_data.drops.as_metrics("train") | val_data.drops.as_metrics("val"))
        params = dict(params or {})
        if trials or timeout:
            params |= tune(model, train_data, trials or 1_000_000, timeout)
        fitted = (fit or fit_in_process(fs))(model, params)
        estimator, baseline = fitted.estimator, fitted.baseline
        pipeline = TripDurationPipeline(model, estimator, pre)
        val_pred = pipeline.predict_features(val_x)
        baseline_pred = baseline.predict(val_x)
        metrics = {f"train_{k}": v for k, v in fitted.train_metrics.items()}
        metrics |= {f"val_{k}": v for k, v in regression_metrics(val_y, val_pred).items()}
        metrics["baseline_val_rmse"] = regression_metrics(val_y, baseline_pred)["rmse"]
        metrics["train_seconds"] = fitted.seconds
        mlflow.log_params({"model": model, "color": train_data.color, "train_month": str(train_data.month),
                           "val_month": str(val_data.month), "min_duration": settings.min_duration,
                           "max_duration": settings.max_duration, "max_distance": settings.max_distance,
                           "trials": trials} | estimator.params())
        mlflow.log_metrics(metrics)
        for name, figure in _plots(val_y, val_pred, run_name).items():
            mlflow.log_figure(figure, name)
            plt.close(figure)
        model_uri = _log_model(pipeline, val_data, val_x, val_pred)
        log.info("run %s: val RMSE %.3f (rule baseline %.3f)", run.info.run_id, metrics["val_rmse"],
                 metrics["baseline_val_rmse"])
    return TrainingResult(run.info.run_id, model_uri, model, estimator.params(), metrics, pipeline,
                          (train_data.start, train_data.end), baseline, val_pred, baseline_pred)


def evaluate(pipeline: TripDurationPipeline, data: MonthData) -> dict[str, float]:
    """RMSE, MAE and R² of a pipeline on a cleaned month, plus the row count."""
    return regression_metrics(feats.targets(data.rides), pipeline.predict(data.rides)) | {"rows": len(data.rides)}


def _log_model(pipeline: TripDurationPipeline, val_data: MonthData, val_x: pd.DataFrame,
               val_pred: np.ndarray) -> str:
    example = val_data.rides.head(5)[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]].copy()
    example[["PULocationID", "DOLocationID"]] = example[["PULocationID", "DOLocationID"]].astype("int64")
    signature = ModelSignature(inputs=INPUT_SCHEMA, outputs=Schema([ColSpec("double")]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = pipeline.save(Path(tmp) / "pipeline")
        # The validation month's rides and their predictions: monitoring's reference, kept with the model.
        reference = _reference(pipeline, val_data, val_x, val_pred)
        ref_path = Path(tmp) / "validation.parquet"
        reference.to_parquet(ref_path, index=False)
        # What is logged, as digests in the tracking store: serving checks the files it downloads against them.
        digests = verify.pipeline_digests(folder) | {verify.REFERENCE_ARTIFACT: verify.sha256(ref_path)}
        mlflow.set_tag(verify.DIGESTS_TAG, json.dumps(digests))
        mlflow.log_artifact(str(ref_path), artifact_path=str(Path(verify.REFERENCE_ARTIFACT).parent))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE), artifacts={verify.PIPELINE_ARTIFACT: str(folder)},
            signature=signature, input_example=example, pip_requirements=_requirements(),
        )
    return info.model_uri


def _reference(pipeline: TripDurationPipeline, val_data: MonthData, val_x: pd.DataFrame,
               val_pred: np.ndarray) -> pd.DataFrame:
    """Model input, prediction and actual duration of every validation ride, whatever its duration."""
    rides = val_data.inputs if val_data.inputs is not None else val_data.rides
    features = val_x if rides is val_data.rides else pipeline.preprocessor.transform(rides)
    reference = features.copy()
    reference["prediction"] = val_pred if rides is val_data.rides else pipeline.predict_features(features)
    reference[feats.TARGET] = (rides[feats.TARGET].to_numpy(float) if feats.TARGET in rides
                               else feats.duration_minutes(rides))
    return reference


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "pandas", "numpy", "scikit-learn", "lightgbm")]
