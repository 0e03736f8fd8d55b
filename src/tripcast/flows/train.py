"""The training pipeline as a Prefect flow: load -> validate -> features -> train -> evaluate -> register."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.deployments.runner import EntrypointType
from prefect.runtime import flow_run

from tripcast import features as feats
from tripcast import interrupts, promotion, training
from tripcast.cluster import check_trainable, cluster_of
from tripcast.config import Settings, load_settings
from tripcast.data import tlc
from tripcast.flows import retry_unless_data_error, say
from tripcast.models import DEFAULT_FAMILY
from tripcast.registry import CHALLENGER, CHAMPION, FLOW_RUN_TAG, OUTCOME_TAG, Registry
from tripcast.tracking import require_registry


# DataFrames flow between tasks in memory: no result persistence and no input hashing (cache_policy=NONE).
@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_data_error, cache_policy=NONE)
def load(color: str, month: tlc.Month, settings: Settings) -> pd.DataFrame:
    return tlc.read_month(color, month, settings)


def _log_drops(data: training.MonthData) -> training.MonthData:
    get_run_logger().info("%s: %d rows in, %d kept, dropped %s", data.label, data.drops.rows_in,
                          data.drops.rows_out, {k: v for k, v in data.drops.dropped.items() if v})
    return data


@task(cache_policy=NONE)
def validate(color: str, months: list[tlc.Month], raws: list[pd.DataFrame], settings: Settings) -> training.MonthData:
    return _log_drops(training.prepare_months(color, months, raws, settings))


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_data_error, cache_policy=NONE)
def load_on_cluster(client: Any, color: str, months: list[tlc.Month], settings: Settings) -> training.MonthData:
    """Read and validate months on the Dask cluster: the rides stay there (a Dask frame)."""
    from tripcast.cluster.data import month_data

    return _log_drops(month_data(client, color, months, settings))


@task(cache_policy=NONE)
def features(train_data: training.MonthData, val_data: training.MonthData) -> training.FeatureSet:
    return training.build_features(train_data, val_data)


@task(cache_policy=NONE)
def train(train_data: training.MonthData, val_data: training.MonthData, fs: training.FeatureSet, model: str,
          settings: Settings, trials: int, timeout: float | None,
          fit: training.Fitter | None = None) -> training.TrainingResult:
    return training.train(train_data, val_data, model, settings, trials=trials, timeout=timeout, features=fs,
                          fit=fit)


# What to do, under the registry's lock, with a version that passed the offline gate instead of promoting it
# (the retrain flow starts an online experiment); returns what it did, for the flow's result.
Passed = Callable[[Registry, str, promotion.Judgement], dict[str, Any]]


@task(cache_policy=NONE)
def register(result: training.TrainingResult, validation: training.MonthData, settings: Settings, promote: bool,
             min_rows: int = 0, tags: dict[str, str] | None = None, fresh: promotion.FreshWindow | None = None,
             passed: Passed | None = None) -> dict[str, Any]:
    """Register the version; then, holding the registry's lock, judge it against the champion (out of sample,
    both verified) and apply the decision (or hand a version that passed to ``passed``), so that concurrent runs
    decide one at a time."""
    registry = Registry(settings)
    attempt = registration_key()
    earlier = registry.registered_by(attempt) if attempt else None
    # Decided: promoted, rejected, or in an experiment. "interrupted" (a handler ran as the attempt stopped) and
    # no decision at all (killed outright) are decided now.
    if earlier is not None and earlier.tags.get("promotion.decision", "interrupted") != "interrupted":
        get_run_logger().info("version %s was registered and decided by an earlier attempt of this run: not again",
                              earlier.version)
        return _outcome_of(earlier)
    if earlier is not None:
        get_run_logger().info("version %s was registered by an earlier attempt of this run: deciding it",
                              earlier.version)
    mv = earlier or registry.register(result.model_uri, result.run_id, tags={"model": result.model} | (tags or {}) | (
        {FLOW_RUN_TAG: attempt} if attempt else {}))
    then = None
    try:
        with registry.decision_lock():
            judged = promotion.judge(registry, mv, result, validation, settings, min_rows, fresh)
            if promote and judged.decision.promote and passed is not None:
                then = passed(registry, str(mv.version), judged)
            elif promote:
                mv = registry.apply(mv.version, judged.decision)
    except BaseException as exc:  # Ctrl-C, SIGTERM or a failure before the decision: no stray challenger
        with suppress(Exception):
            registry.abandon(str(mv.version), f"no decision: the run stopped ({type(exc).__name__}) before it")
        raise
    decision, promoted = judged.decision, promote and judged.decision.promote and then is None
    get_run_logger().info("version %s: %s (%s)", mv.version, "promoted" if promoted else "not promoted",
                          decision.reason)
    alias = CHAMPION if promoted else CHALLENGER if then is not None or not promote else None
    outcome = {"version": str(mv.version), "alias": alias, "promoted": promoted, "flow_run": attempt,
               "reason": decision.reason, "challenger_rmse": decision.challenger_rmse,
               "baseline_rmse": decision.baseline_rmse, "champion_before": judged.champion_version,
               "champion_rmse": judged.champion_rmse, "compared_on": judged.compared_on, "compared_rows": judged.rows,
               "passed_gate": promote and judged.decision.promote, "then": then}
    with suppress(Exception):  # only a re-run after a crash reads it; without it, one is rebuilt from the tags
        registry.record(str(mv.version), {OUTCOME_TAG: json.dumps(outcome, default=str)})
    return outcome


_registrations: dict[str, int] = {}
_registrations_lock = threading.Lock()


def registration_key() -> str | None:
    """Which registration of its run this is: the root flow run (the deployment's run, which crash recovery
    schedules again) and how many registrations that run made before this one in this process. A re-run takes
    the same steps in the same order, so its n-th registration is its crashed attempt's n-th."""
    root = flow_run.root_flow_run_id
    if not root:
        return None
    with _registrations_lock:
        n = _registrations[str(root)] = _registrations.get(str(root), -1) + 1
    return f"{root}/{n}"


def _outcome_of(version: ModelVersion) -> dict[str, Any]:
    """What the decision step of the attempt that registered ``version`` returned."""
    tags = version.tags
    if OUTCOME_TAG in tags:
        with suppress(ValueError):
            return json.loads(tags[OUTCOME_TAG])
    number = lambda key: float(tags[key]) if tags.get(key) else None  # noqa: E731
    decision = tags["promotion.decision"]
    return {"version": str(version.version), "alias": None, "promoted": decision == "promoted",
            "flow_run": tags.get(FLOW_RUN_TAG),
            "reason": tags.get("promotion.reason", ""), "challenger_rmse": number("promotion.challenger_rmse"),
            "baseline_rmse": number("promotion.baseline_rmse"), "champion_before": None,
            "champion_rmse": number("promotion.champion_rmse"), "compared_on": None, "compared_rows": None,
            "passed_gate": decision in ("promoted", "experiment"), "then": None}


def fresh_month(color: str, validation: tlc.Month, settings: Settings) -> promotion.FreshWindow:
    """The first of the three months after ``validation`` that the source has and neither model trained on."""
    def fresh(trained_on: list[tuple[datetime, datetime]]) -> training.MonthData | None:
        for month in (validation.shift(k) for k in (1, 2, 3)):
            if not any(start < month.end and month.start < end for start, end in trained_on) \
                    and tlc.month_exists(color, month, settings):
                return training.read_month_data(color, month, settings)
        return None

    return fresh


@flow(name="train")
def train_flow(
    color: str = "green",
    train_month: str | None = None,
    val_month: str | None = None,
    model: str = DEFAULT_FAMILY,
    trials: int = 0,
    timeout: float | None = None,
    promote: bool = True,
    train_to: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on one month (or ``train_month`` to ``train_to``), validate on another, register it, apply
    the promotion policy. With TRIPCAST_DASK set, the training months are read and the model fitted on the Dask
    cluster; the validation month and the decision stay here.

    With no months given, trains on the two most recent months the TLC publishes (for the schedule).
    """
    settings = load_settings()
    tlc.check_color(color)
    check_trainable(settings, model, bool(trials or timeout))
    require_registry(settings)  # before any data is loaded: one line if it does not answer
    if train_month is None or val_month is None:
        latest_train, latest_val = tlc.latest_months(color, settings)
        train_month, val_month = train_month or str(latest_train), val_month or str(latest_val)
    train_ms = tlc.month_range(train_month, train_to or train_month)
    val_m = tlc.Month.parse(val_month)
    with cluster_of(settings) as client:
        fit = None
        if client is None:
            train_data = validate(color, train_ms, [load(color, m, settings) for m in train_ms], settings)
        else:
            from tripcast.cluster.training import fitter

            train_data = load_on_cluster(client, color, train_ms, settings)
            fit = fitter(client, train_data.rides, feats.Preprocessor())
        val_data = validate(color, [val_m], [load(color, val_m, settings)], settings)
        fs = features(train_data, val_data) if fit is None else training.validation_features(val_data)
        result = train(train_data, val_data, fs, model, settings, trials, timeout, fit)
    registration = register(result, val_data, settings, promote, fresh=fresh_month(color, val_m, settings))
    return {
        "run_id": result.run_id, "model": model, "color": color, "train_month": tlc.month_label(train_ms),
        "val_month": str(val_m), "registered_model": settings.model_name, **registration,
        "metrics": {k: round(v, 4) for k, v in result.metrics.items()},
    }


@flow(name="evaluate")
def evaluate_flow(color: str = "green", month: str = "2021-03", alias: str = CHAMPION) -> dict[str, Any]:
    """A registered model (by alias or version) on a month it has not seen."""
    settings = load_settings()
    require_registry(settings)
    month_ = tlc.Month.parse(month)
    with cluster_of(settings) as client:
        version, pipeline = Registry(settings).load_pipeline(alias)
        if client is None:
            figures = training.evaluate(pipeline, validate(color, [month_], [load(color, month_, settings)], settings))
        else:
            from tripcast.cluster.training import evaluate

            figures = evaluate(load_on_cluster(client, color, [month_], settings), pipeline)
    return {"version": str(version.version), "alias": alias, "color": color, "month": month, **figures}


@flow(name="quickstart")
def quickstart_flow(color: str = "green", train_month: str = "2021-01", val_month: str = "2021-02",
                    test_month: str = "2021-03") -> dict[str, Any]:
    """Rule baseline, linear and boosted models on the same months; the policy promotes the best; the
    champion is then scored on a third month."""
    runs = []
    for model in ("baseline", "linear", DEFAULT_FAMILY):
        say(f"{model}: training on {color} {train_month}, validating on {val_month}")
        runs.append(train_flow(color, train_month, val_month, model))
        run = runs[-1]
        say(f"{model}: version {run['version']}, {'promoted' if run['promoted'] else 'rejected'} "
            f"(RMSE {run['challenger_rmse']:.3f})")
        interrupts.check()
    say(f"testing the champion on {color} {test_month}")
    test = evaluate_flow(color, test_month, CHAMPION)
    interrupts.check()
    return {"runs": runs, "test": test}


def deployment(cron: str, model: str, color: str, name: str = "monthly-retrain"):
    """A deployment of ``train`` on a cron schedule; with no months it trains on the latest two."""
    return train_flow.to_deployment(
        name=name, cron=cron, parameters={"color": color, "model": model}, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Retrain on the two most recent TLC months and apply the promotion policy.")
