"""Rides in, predictions out: each ride's arm from the traffic policy, its prediction from that arm's model,
and its row for the prediction log (which the caller queues when the answer is out: the stream consumer
only once the prediction is published). The API and the stream consumer both score through here.

One ride takes the models' single-row path (no arrays); a batch is scored vectorised, once per arm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tripcast.errors import TripcastError
from tripcast.features import local_naive
from tripcast.serving.holder import LoadedModel, ModelHolder
from tripcast.serving.schemas import Ride, RideColumns, random_ids
from tripcast.serving.traffic import CHALLENGER_ARM, CHAMPION_ARM, TrafficPolicy
from tripcast.store import log_time

Counter = Callable[[str, str, int], None]  # (version, arm, rides) -> None


class NoModelError(TripcastError):
    """The alias has no loaded model yet."""


class UnknownVersionError(TripcastError):
    """A version asked for by name that neither the champion nor the challenger serves."""


class Scorer:
    def __init__(self, champion: ModelHolder, challenger: ModelHolder | None, policy: Callable[[], TrafficPolicy],
                 source: str, count: Counter | None = None) -> None:
        # ``policy`` is asked once per request: the API's follows the running experiment.
        self.champion, self.challenger, self.policy = champion, challenger, policy
        self.source, self.count = source, count

    def _models(self) -> dict[str, LoadedModel]:
        """The models answering now, read once per request: a swap mid-request does not mix versions."""
        served = self.champion.current
        if served is None:
            raise NoModelError(f"no model loaded: the registry has no '{self.champion.alias}' version yet"
                               + (f" (last error: {self.champion.last_error})" if self.champion.last_error else ""))
        other = self.challenger.current if self.challenger is not None else None
        return {CHAMPION_ARM: served} | ({CHALLENGER_ARM: other} if other is not None else {})

    def served(self) -> dict[str, str]:
        """Version -> arm, for the versions answering now."""
        holders = {CHAMPION_ARM: self.champion, CHALLENGER_ARM: self.challenger}
        return {h.current.version: arm for arm, h in holders.items() if h is not None and h.current is not None}

    def not_served(self, version: str) -> UnknownVersionError:
        versions = ", ".join(f"{v} ({arm})" for v, arm in self.served().items()) or "none yet"
        return UnknownVersionError(f"version {version[:40]!r} of {self.champion.registry.name} is not served here "
                                   f"(serving {versions})")

    def one(self, ride: Ride) -> tuple[dict, list[tuple]]:
        """The answer for one ride, and its log row."""
        models = self._models()
        ride_id = ride.get("ride_id") or random_ids(1)[0]
        arm = self.policy().arm(ride_id, CHALLENGER_ARM in models)
        model = models[arm]
        pickup = local_naive(ride.get("pickup_datetime"))
        pu, do, distance = ride["PULocationID"], ride["DOLocationID"], ride["trip_distance"]
        duration = model.pipeline.predict_one(pu, do, distance, pickup)
        if self.count is not None:
            self.count(model.version, arm, 1)
        row = (ride_id, log_time(), log_time(pickup), pu, do, distance, duration, model.version, arm, self.source,
               None, None)
        return {"ride_id": ride_id, "duration": duration, "arm": arm, "model": model.ref}, [row]

    def many(self, columns: RideColumns, version: str | None = None) -> Scored:
        """A batch's answers (vectorised per arm) and their log rows. With ``version``, every ride is scored by
        that version (the champion's or the challenger's), whatever the traffic policy says."""
        models = self._models()
        if version is not None:
            arm = next((arm for arm, model in models.items() if model.version == version), None)
            if arm is None:
                raise self.not_served(version)
            models = {arm: models[arm]}
            arms = np.full(len(columns), arm)
        else:
            arms = self.policy().arms(columns.ride_ids, CHALLENGER_ARM in models)
        durations = np.empty(len(columns))
        versions = np.empty(len(columns), dtype=object)
        for arm, model in models.items():
            chosen = arms == arm
            if chosen.all():
                # Each model turns rides into input with its own (saved) preprocessor.
                durations[:] = model.pipeline.predict_features(columns.features(model.pipeline.preprocessor))
            elif chosen.any():
                durations[chosen] = model.pipeline.predict_features(
                    columns.features(model.pipeline.preprocessor, chosen))
            versions[chosen] = model.version
            if self.count is not None and chosen.any():
                self.count(model.version, arm, int(chosen.sum()))
        arm_list, version_list = arms.tolist(), versions.tolist()
        return Scored(columns.ride_ids, durations, version_list, arm_list,
                      {arm: model.ref for arm, model in models.items()},
                      columns.log_rows(durations, version_list, arm_list, self.source))


class Scored(NamedTuple):
    """A batch's answers as columns, and their prediction-log rows."""

    ride_ids: list[str]
    durations: np.ndarray
    versions: list[str]
    arms: list[str]
    refs: dict[str, dict]  # arm -> the model's reference (name, version, alias)
    log_rows: list[tuple]

    def records(self) -> list[dict]:
        """One answer per ride, as ``/predict`` gives it."""
        refs = self.refs
        return [{"ride_id": ride_id, "duration": duration, "arm": arm, "model": refs[arm]}
                for ride_id, duration, arm in zip(self.ride_ids, self.durations.tolist(), self.arms, strict=True)]

    def columns(self) -> dict:
        """The answers as columns (a columnar or Arrow batch's answer)."""
        return {"ride_id": self.ride_ids, "duration": self.durations, "model_version": self.versions,
                "arm": self.arms}

    @property
    def version_header(self) -> str:
        return ",".join(sorted(set(self.versions)))
