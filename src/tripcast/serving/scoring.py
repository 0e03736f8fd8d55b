"""Rides in, predictions out: each ride's arm from the traffic policy, its prediction from that arm's model,
and its row for the prediction log (which the caller queues when the answer is out: the stream consumer
only once the prediction is published). The API and the stream consumer both score through here.

One ride takes the models' single-row path (no arrays); a batch is scored vectorised, once per arm.
"""

from __future__ import annotations

from collections.abc import Callable

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

    def many(self, rides: list[Ride]) -> tuple[list[dict], list[tuple]]:
        """The answers for a batch (vectorised per arm), and their log rows."""
        models = self._models()
        columns = RideColumns(rides)
        arms = self.policy().arms(columns.ride_ids, CHALLENGER_ARM in models)
        durations = np.empty(len(rides))
        versions = np.empty(len(rides), dtype=object)
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
        arm_list = arms.tolist()
        refs = {arm: model.ref for arm, model in models.items()}
        results = [{"ride_id": ride_id, "duration": duration, "arm": arm, "model": refs[arm]}
                   for ride_id, duration, arm in zip(columns.ride_ids, durations.tolist(), arm_list, strict=True)]
        return results, columns.log_rows(durations, versions.tolist(), arm_list, self.source)
