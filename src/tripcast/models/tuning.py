"""Optuna search spaces per model family."""

from __future__ import annotations

from typing import Any

import optuna


def suggest_params(trial: optuna.Trial, family: str) -> dict[str, Any]:
    if family == "lightgbm":
        return {
            "num_leaves": trial.suggest_int("num_leaves", 15, 255, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "n_estimators": trial.suggest_int("n_estimators", 30, 600, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 10, 200, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.6, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.6, 1.0),
            "cat_smooth": trial.suggest_float("cat_smooth", 1.0, 50.0, log=True),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
            "pair_smoothing": trial.suggest_float("pair_smoothing", 0.5, 50.0, log=True),
        }
    if family in ("ridge", "lasso"):
        return {"alpha": trial.suggest_float("alpha", 1e-4, 10.0, log=True)}
    if family == "baseline":
        return {"min_trips": trial.suggest_int("min_trips", 1, 50, log=True)}
    raise ValueError(f"model {family!r} has no hyper-parameters to tune")
