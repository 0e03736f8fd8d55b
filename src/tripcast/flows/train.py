"""The training pipeline as a Prefect flow: load -> validate -> features -> train -> evaluate -> register."""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from tripcast import training
from tripcast.config import Settings, load_settings
from tripcast.data import tlc
from tripcast.flows import retry_unless_data_error
from tripcast.models import DEFAULT_FAMILY
from tripcast.registry import CHALLENGER, CHAMPION, Registry, decide


# DataFrames flow between tasks in memory: no result persistence and no input hashing (cache_policy=NONE).
@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_data_error, cache_policy=NONE)
def load(color: str, month: tlc.Month, settings: Settings) -> pd.DataFrame:
    return tlc.read_month(color, month, settings)


@task(cache_policy=NONE)
def validate(color: str, month: tlc.Month, raw: pd.DataFrame, settings: Settings) -> training.MonthData:
    data = training.prepare_month(color, month, raw, settings)
    get_run_logger().info("%s: %d rows in, %d kept, dropped %s", data.label, data.drops.rows_in,
                          data.drops.rows_out, {k: v for k, v in data.drops.dropped.items() if v})
    return data


@task(cache_policy=NONE)
def features(train_data: training.MonthData, val_data: training.MonthData) -> training.FeatureSet:
    return training.build_features(train_data, val_data)


@task(cache_policy=NONE)
def train(train_data: training.MonthData, val_data: training.MonthData, fs: training.FeatureSet, model: str,
          settings: Settings, trials: int, timeout: float | None) -> training.TrainingResult:
    return training.train(train_data, val_data, model, settings, trials=trials, timeout=timeout, features=fs)


@task(cache_policy=NONE)
def evaluate(val_data: training.MonthData, settings: Settings) -> dict[str, Any] | None:
    """The current champion on the same validation rows, so the comparison is like for like."""
    registry = Registry(settings)
    if registry.current(CHAMPION) is None:
        return None
    version, pipeline = registry.load_pipeline(CHAMPION)
    return {"version": str(version.version), **training.evaluate(pipeline, val_data)}


@task(cache_policy=NONE)
def register(result: training.TrainingResult, champion: dict[str, Any] | None, settings: Settings,
             promote: bool, min_rows: int = 0, tags: dict[str, str] | None = None) -> dict[str, Any]:
    registry = Registry(settings)
    mv = registry.register(result.model_uri, result.run_id, tags={"model": result.model} | (tags or {}))
    decision = decide(result.val_rmse, champion["rmse"] if champion else None, result.baseline_rmse,
                      settings.promotion_margin, rows=len(result.val_predictions), min_rows=min_rows)
    if promote:
        mv = registry.apply(mv.version, decision)
    get_run_logger().info("version %s: %s (%s)", mv.version,
                          "promoted" if promote and decision.promote else "not promoted", decision.reason)
    return {"version": str(mv.version), "alias": CHAMPION if promote and decision.promote else CHALLENGER,
            "promoted": promote and decision.promote, "reason": decision.reason,
            "challenger_rmse": decision.challenger_rmse, "baseline_rmse": decision.baseline_rmse,
            "champion_before": champion["version"] if champion else None}


@flow(name="train")
def train_flow(
    color: str = "green",
    train_month: str | None = None,
    val_month: str | None = None,
    model: str = DEFAULT_FAMILY,
    trials: int = 0,
    timeout: float | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Train ``model`` on one month, validate on another, register it, apply the promotion policy.

    With no months given, trains on the two most recent months the TLC publishes (for the schedule).
    """
    settings = load_settings()
    tlc.check_color(color)
    if train_month is None or val_month is None:
        latest_train, latest_val = tlc.latest_months(color, settings)
        train_month, val_month = train_month or str(latest_train), val_month or str(latest_val)
    train_m, val_m = tlc.Month.parse(train_month), tlc.Month.parse(val_month)
    train_raw, val_raw = load(color, train_m, settings), load(color, val_m, settings)
    train_data = validate(color, train_m, train_raw, settings)
    val_data = validate(color, val_m, val_raw, settings)
    fs = features(train_data, val_data)
    result = train(train_data, val_data, fs, model, settings, trials, timeout)
    champion = evaluate(val_data, settings)
    registration = register(result, champion, settings, promote)
    return {
        "run_id": result.run_id, "model": model, "color": color, "train_month": str(train_m),
        "val_month": str(val_m), "registered_model": settings.model_name, **registration,
        "metrics": {k: round(v, 4) for k, v in result.metrics.items()},
        "champion_val_rmse_before": round(champion["rmse"], 4) if champion else None,
    }


@flow(name="evaluate")
def evaluate_flow(color: str = "green", month: str = "2021-03", alias: str = CHAMPION) -> dict[str, Any]:
    """A registered model (by alias or version) on a month it has not seen."""
    settings = load_settings()
    raw = load(color, tlc.Month.parse(month), settings)
    data = validate(color, tlc.Month.parse(month), raw, settings)
    version, pipeline = Registry(settings).load_pipeline(alias)
    return {"version": str(version.version), "alias": alias, "color": color, "month": month,
            **training.evaluate(pipeline, data)}


@flow(name="quickstart")
def quickstart_flow(color: str = "green", train_month: str = "2021-01", val_month: str = "2021-02",
                    test_month: str = "2021-03") -> dict[str, Any]:
    """Rule baseline, linear and boosted models on the same months; the policy promotes the best; the
    champion is then scored on a third month."""
    runs = [train_flow(color, train_month, val_month, model) for model in ("baseline", "linear", DEFAULT_FAMILY)]
    test = evaluate_flow(color, test_month, CHAMPION)
    return {"runs": runs, "test": test}


def deployment(cron: str, model: str, color: str, name: str = "monthly-retrain"):
    """A deployment of ``train`` on a cron schedule; with no months it trains on the latest two."""
    return train_flow.to_deployment(
        name=name, cron=cron, parameters={"color": color, "model": model},
        description="Retrain on the two most recent TLC months and apply the promotion policy.")
