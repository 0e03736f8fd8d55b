"""The rule every model must beat: the median duration of the zone pair; for pairs seen fewer than
``min_trips`` times, the median duration of rides of about the same distance (1-mile bins)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from tripcast.models.base import lookup, read_json, write_json

DISTANCE_BINS = 30  # 0-1, 1-2, ... 29+ miles


def distance_bin(distance: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(distance, nan=0.0), 0, DISTANCE_BINS - 1).astype(np.int64)


class ZonePairMedian:
    family: ClassVar[str] = "baseline"

    def __init__(self, min_trips: int = 5) -> None:
        self.min_trips = int(min_trips)
        self.pairs = np.empty(0, dtype=np.int64)
        self.pair_medians = np.empty(0, dtype=np.float64)
        self.distance_medians = np.zeros(DISTANCE_BINS, dtype=np.float64)

    def fit(self, features: pd.DataFrame, target: np.ndarray) -> Self:
        frame = pd.DataFrame({"pair": np.asarray(features["zone_pair"]), "y": target,
                              "bin": distance_bin(np.asarray(features["trip_distance"]))})
        return self.set_medians(frame.groupby("pair")["y"].agg(["size", "median"]),
                                frame.groupby("bin")["y"].median(), float(np.median(target)))

    def set_medians(self, by_pair: pd.DataFrame, by_bin: pd.Series, overall: float) -> Self:
        """From the medians (``by_pair``: size and median per zone pair; ``by_bin``: median per distance bin),
        wherever they were computed: here, or by a cluster's groupby (tripcast.cluster.training)."""
        by_pair = by_pair[by_pair["size"] >= self.min_trips].sort_index()
        self.pairs = by_pair.index.to_numpy(dtype=np.int64)
        self.pair_medians = by_pair["median"].to_numpy(dtype=np.float64)
        # Empty bins borrow from the nearest shorter bin (distance medians grow with distance).
        by_bin = by_bin.reindex(range(DISTANCE_BINS))
        self.distance_medians = by_bin.ffill().bfill().fillna(overall).to_numpy(np.float64)
        return self

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        fallback = self.distance_medians[distance_bin(np.asarray(features["trip_distance"]))]
        return lookup(self.pairs, self.pair_medians, np.asarray(features["zone_pair"]), fallback)

    def params(self) -> dict[str, Any]:
        return {"min_trips": self.min_trips}

    def save(self, folder: Path) -> None:
        write_json(folder / "baseline.json", {
            "min_trips": self.min_trips, "pairs": self.pairs.tolist(), "pair_medians": self.pair_medians.tolist(),
            "distance_medians": self.distance_medians.tolist(),
        })

    @classmethod
    def load(cls, folder: Path) -> Self:
        data = read_json(folder / "baseline.json")
        model = cls(min_trips=data["min_trips"])
        model.pairs = np.asarray(data["pairs"], dtype=np.int64)
        model.pair_medians = np.asarray(data["pair_medians"], dtype=np.float64)
        model.distance_medians = np.asarray(data["distance_medians"], dtype=np.float64)
        return model
