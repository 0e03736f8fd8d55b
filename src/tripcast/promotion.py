"""Judging a new version against the champion: on rides neither was trained on, only once both pass
verification, and under the registry's lock (``Registry.decision_lock``) so that runs decide one at a time.

The champion's score on rides it was trained on is in-sample, and flatters it: a challenger validated on the
champion's training month lost to it for that reason alone. So the comparison keeps the validation rides
outside the champion's training period; if none are left, both are scored on a fresh window instead (a
month neither was trained on), and with none at hand the challenger is not promoted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from mlflow.entities.model_registry import ModelVersion

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.errors import ModelVerificationError
from tripcast.metrics import regression_metrics
from tripcast.models import TripDurationPipeline
from tripcast.registry import CHAMPION, PromotionDecision, Registry, decide
from tripcast.training import MonthData, TrainingResult

log = logging.getLogger(__name__)
# A fresh window for the comparison, given the periods the two models were trained on; None if there is none.
FreshWindow = Callable[[list[tuple[datetime, datetime]]], MonthData | None]


@dataclass(frozen=True)
class Judgement:
    decision: PromotionDecision
    champion_version: str | None
    champion_rmse: float | None
    rows: int  # rides the comparison was made on
    compared_on: str  # which rides, in words


def _outside(data: MonthData, period: tuple[datetime, datetime]) -> np.ndarray:
    pickup = data.rides["pickup_datetime"]
    return ((pickup < period[0]) | (pickup >= period[1])).to_numpy()


def _rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    return regression_metrics(actual, predicted)["rmse"]


def judge(registry: Registry, version: ModelVersion, result: TrainingResult, validation: MonthData,
          settings: Settings, min_rows: int = 0, fresh: FreshWindow | None = None) -> Judgement:
    """Whether ``version`` (the model of ``result``, validated on ``validation``) should become champion.
    Call it holding ``registry.decision_lock()``, and apply what it says before letting go."""
    def reject(reason: str, champion: str | None = None) -> Judgement:
        decision = PromotionDecision(False, reason, result.val_rmse, None, result.baseline_rmse,
                                     settings.promotion_margin)
        return Judgement(decision, champion, None, 0, "nothing")

    try:
        registry.verified_pipeline(version)
    except ModelVerificationError as exc:
        return reject(str(exc))
    champion_mv = registry.by_alias(CHAMPION)
    champion: TripDurationPipeline | None = None
    note = ""
    if champion_mv is not None:
        try:
            champion = registry.verified_pipeline(champion_mv)
        except ModelVerificationError as exc:  # a damaged champion is replaced, not a reason to keep it
            note = f"the champion cannot be used ({exc}); compared with the rule baseline only: "
    if champion is None:
        decision = decide(result.val_rmse, None, result.baseline_rmse, settings.promotion_margin,
                          rows=len(validation.rides), min_rows=min_rows)
        return Judgement(_noted(decision, note), None, None, len(validation.rides), "the validation rides")

    champion_version = str(champion_mv.version)
    champion_period = registry.training_period(champion_mv)
    keep = _outside(validation, champion_period) if champion_period else np.ones(len(validation.rides), bool)
    rows = int(keep.sum())
    if rows >= max(min_rows, 1):
        actual = feats.targets(validation.rides)[keep]
        scores = (_rmse(actual, result.val_predictions[keep]),
                  _rmse(actual, champion.predict(validation.rides[keep])),
                  _rmse(actual, result.val_baseline_predictions[keep]))
        compared_on = "the validation rides"
        if not keep.all():
            compared_on = f"the {rows:,} validation rides outside the champion's training period"
            note += f"on {compared_on}: "
    else:
        said = (f"the champion (version {champion_version}) was trained on the rides this version is validated on "
                f"({validation.month}" + (f"; {rows:,} outside its training period" if rows else "") + ")")
        trained_on = [p for p in (champion_period, result.train_period) if p is not None]
        window = fresh(trained_on) if fresh is not None else None
        if window is None or len(window.rides) < max(min_rows, 1):
            return reject(f"{said}, and no fresh window is at hand to compare them on: not promoted",
                          champion_version)
        actual = feats.targets(window.rides)
        pipeline = result.pipeline
        scores = (_rmse(actual, pipeline.predict(window.rides)), _rmse(actual, champion.predict(window.rides)),
                  _rmse(actual, result.baseline.predict(pipeline.preprocessor.transform(window.rides))))
        rows, compared_on = len(window.rides), f"{window.color} {window.month}, which neither model was trained on"
        note += f"{said}; compared on {compared_on}: "
        log.info("%s; comparing them on %s", said, window.label)
    decision = decide(*scores, settings.promotion_margin, rows=rows, min_rows=min_rows)
    return Judgement(_noted(decision, note), champion_version, scores[1], rows, compared_on)


def _noted(decision: PromotionDecision, note: str) -> PromotionDecision:
    if not note:
        return decision
    return PromotionDecision(decision.promote, note + decision.reason, decision.challenger_rmse,
                             decision.champion_rmse, decision.baseline_rmse, decision.margin)
