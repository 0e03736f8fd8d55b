"""The error rates of tripcast's online decisions, simulated from real rides' errors; and its drift alarms on
real windows (bench/experiments.py and the tests use both).

Two real models' errors on the same real rides are the population. The challenger's are scaled so that its
true RMSE is a chosen multiple of the champion's (1.0: equally good; 0.97: 3 % better) while keeping the shape
of real errors (heavy tails, and the two models' correlation ride by ride). Each simulated experiment draws
rides from the population as traffic would bring them (shadow: both models' errors on each ride; A/B: each ride
answered by one arm, a share ``weight`` by the challenger) and is looked at every ``look_every`` labelled rides,
as the monitoring flow would after each window, until a decision or ``max_rides``. The same draws are also
judged by a naive one-sided z-test re-run at every look, to show what peeking costs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.monitoring import stats
from tripcast.monitoring.windows import Reference, measure


def scaled(champion: np.ndarray, challenger: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Squared errors of both models, the challenger's residuals scaled so that its RMSE over the population is
    ``ratio`` times the champion's."""
    factor = ratio * np.sqrt(np.mean(champion ** 2) / np.mean(challenger ** 2))
    return champion ** 2, (challenger * factor) ** 2


@dataclass(frozen=True)
class Rates:
    promoted: float  # share of experiments that promoted the challenger
    rejected_worse: float  # rejected as worse (futility not counted)
    rides_to_promote: float | None  # median labelled rides of the promoted ones
    naive_promoted: float  # the naive test's promotions on the same draws


def simulate(champion_sq: np.ndarray, challenger_sq: np.ndarray, mode: str, weight: float = 0.5, *,
             margin: float = 0.01, alpha: float = 0.05, planned: int = 20_000, min_rides: int = 1_000,
             max_rides: int = 200_000, look_every: int = 2_000, experiments: int = 1_000, seed: int = 0,
             batch: int = 50, segment: int = 20_000) -> Rates:
    """``experiments`` experiments, ``batch`` at a time, their rides drawn ``segment`` at a time until every one
    of the batch has decided, for both tests (or reached ``max_rides``)."""
    rng = np.random.default_rng(seed)
    ks = ((1 - margin) ** 2, 1.0)
    z = norm.ppf(1 - alpha)
    segment = max(look_every, segment // look_every * look_every)
    promoted_at, worse, naive = [], 0, 0
    for first in range(0, experiments, batch):
        size = min(batch, experiments - first)
        sums, squares = np.zeros((2, size)), np.zeros((2, size))
        seen = np.zeros((5, size))  # A/B: rides, incumbent rides and error sum, candidate rides and error sum
        open_, naive_hit = np.ones(size, bool), np.zeros(size, bool)
        for done in range(0, max_rides, segment):
            length = min(segment, max_rides - done)
            rides = rng.integers(0, len(champion_sq), size=(size, length))
            if mode == "shadow":
                scores = [stats.paired_scores(champion_sq[rides], challenger_sq[rides], k) for k in ks]
                arm = None
            else:
                arm = rng.random((size, length)) < weight
                errors = np.where(arm, challenger_sq[rides], champion_sq[rides])
                scores = [stats.ab_scores(errors, arm, weight, k, tuple(seen)) for k in ks]
            looks = np.arange(look_every, length + 1, look_every)
            n = done + looks
            bounds = []
            for i, score in enumerate(scores):
                total = sums[i][:, None] + np.cumsum(score, axis=1)[:, looks - 1]
                square = squares[i][:, None] + np.cumsum(score ** 2, axis=1)[:, looks - 1]
                mean = total / n
                bounds.append((mean, np.sqrt(np.maximum(square - n * mean ** 2, 0) / (n - 1))))
                sums[i], squares[i] = total[:, -1], square[:, -1]
            if arm is None:
                ready = np.broadcast_to(n >= min_rides, (size, len(looks)))
            else:
                on_candidate = seen[3][:, None] + np.cumsum(arm, axis=1)[:, looks - 1]
                ready = (np.minimum(on_candidate, n - on_candidate) >= min_rides) & (n >= min_rides)
                seen += [np.full(size, length), (~arm).sum(1), np.where(arm, 0, errors).sum(1), arm.sum(1),
                         np.where(arm, errors, 0).sum(1)]
            (mean, sd), (mean0, sd0) = bounds
            width = stats.boundary(n, alpha, planned)
            better = ready & (mean - width * sd > 0)
            decided = better | (ready & (mean0 + width * sd0 < 0))
            naive_hit |= (ready & (mean - z * sd / np.sqrt(n) > 0)).any(axis=1)
            for row in np.flatnonzero(open_ & decided.any(axis=1)):
                look = decided[row].argmax()
                if better[row, look]:
                    promoted_at.append(int(n[look]))
                else:
                    worse += 1
                open_[row] = False
            if not open_.any() and naive_hit.all():  # the naive test judges the same draws, to the end
                break
        naive += int(naive_hit.sum())
    return Rates(len(promoted_at) / experiments, worse / experiments,
                 float(np.median(promoted_at)) if promoted_at else None, naive / experiments)


# --- drift alarms on real windows ----------------------------------------------------------------------------
RULE_METRICS = {"data_drift": "drift_share", "prediction_drift": "prediction_drift", "od_drift": "od_drift",
                "accuracy": "rmse_ratio"}


def reference_of(pipeline, rides: pd.DataFrame, version: str, settings: Settings) -> Reference:
    """A model's monitoring reference built as training builds it: these rides' features, predictions and
    durations."""
    frame = pipeline.preprocessor.transform(rides)
    frame["prediction"] = pipeline.predict_features(frame)
    frame["duration"] = feats.targets(rides) if feats.TARGET in rides else feats.duration_minutes(rides)
    meant = frame[(frame["duration"] >= settings.min_duration) & (frame["duration"] <= settings.max_duration)]
    rmse = float(np.sqrt(np.mean((meant["prediction"] - meant["duration"]) ** 2)))
    return Reference(version, frame, rmse, float(np.mean(np.abs(meant["prediction"] - meant["duration"]))))


def logged(pipeline, rides: pd.DataFrame, version: str) -> pd.DataFrame:
    """Rides as the monitoring flow reads them from the prediction log, every one labelled."""
    return pd.DataFrame({
        "ride_id": np.arange(len(rides)).astype(str), "PULocationID": rides["PULocationID"].to_numpy(),
        "DOLocationID": rides["DOLocationID"].to_numpy(), "trip_distance": rides["trip_distance"].to_numpy(),
        "prediction": pipeline.predict(rides), "model_version": version, "arm": "champion",
        "shadow_prediction": np.nan, "pickup_datetime": rides["pickup_datetime"].to_numpy(),
        "actual": feats.duration_minutes(rides)})


def alarms(frame: pd.DataFrame, reference: Reference, settings: Settings) -> tuple[dict[str, bool], dict[str, bool]]:
    """Which alert rules a window breaches, measured as the monitoring flow measures it; and which it would with
    the fixed thresholds alone (as before they knew the sample sizes)."""
    measured = {metric: (value, breached) for metric, value, _, breached in measure(frame, reference, settings)}
    aware = {rule: bool(measured.get(metric, (None, False))[1]) for rule, metric in RULE_METRICS.items()}
    if "drift_share" not in measured:
        return aware, dict(aware)
    features = [m for m in measured if m.startswith("drift_") and m != "drift_share"]
    share = np.mean([measured[m][0] >= settings.drift_threshold for m in features])
    fixed = {"data_drift": bool(share >= settings.drift_share),
             "prediction_drift": bool(measured["prediction_drift"][0] >= settings.drift_threshold),
             "od_drift": bool(measured["od_drift"][0] >= settings.od_drift_threshold),
             "accuracy": aware["accuracy"]}
    return aware, fixed
