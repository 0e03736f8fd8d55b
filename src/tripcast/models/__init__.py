"""Model families and the pipeline (preprocessor + estimator) that is saved and registered as one unit."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tripcast.features import Preprocessor
from tripcast.models.base import DurationModel, read_json, write_json

# CLI name -> (family saved in pipeline.json, fixed constructor arguments). Classes are imported on use, so
# a process serving a linear model never pays for importing LightGBM.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "linear": ("linear", {"kind": "linear"}),
    "ridge": ("linear", {"kind": "ridge"}),
    "lasso": ("linear", {"kind": "lasso", "alpha": 0.001}),
    "lightgbm": ("lightgbm", {}),
}
DEFAULT_FAMILY = "lightgbm"
SINGLE_ROW_RIDES = 32  # up to this many rides, one at a time costs less than building arrays (~600 us)
_CLASSES = {
    "baseline": ("tripcast.models.baseline", "ZonePairMedian"),
    "linear": ("tripcast.models.linear", "LinearDuration"),
    "lightgbm": ("tripcast.models.boosted", "LightGBMDuration"),
}


def family_class(family: str) -> type:
    module, name = _CLASSES[family]
    return getattr(importlib.import_module(module), name)


def build(name: str, **params: Any) -> DurationModel:
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(FAMILIES)}")
    family, fixed = FAMILIES[name]
    return family_class(family)(**(fixed | params))


class TripDurationPipeline:
    """Rides in, minutes out: the preprocessor and the estimator, saved together in one folder."""

    def __init__(self, name: str, estimator: DurationModel, preprocessor: Preprocessor | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.preprocessor = preprocessor or Preprocessor()

    def predict(self, rides: pd.DataFrame) -> np.ndarray:
        """Minutes per ride. A frame of a few rides (what an MLflow-compatible server sends per request) takes
        the single-row path, a larger one the vectorised path: the same figures either way."""
        if len(rides) <= SINGLE_ROW_RIDES and (rows := self.preprocessor.rows(rides)) is not None:
            return np.array([self.predict_one(*row) for row in rows], dtype=np.float64)
        return self.predict_features(self.preprocessor.transform(rides))

    def predict_features(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.estimator.predict(features), dtype=np.float64)

    def predict_one(self, pu: int, do: int, distance: float, pickup: datetime) -> float:
        """One ride (pickup in naive New York time): the figure ``predict`` gives it, without building arrays
        when the family has a single-row path."""
        features = self.preprocessor.one(pu, do, distance, pickup)
        single = getattr(self.estimator, "predict_one", None)
        if single is not None:
            return float(single(features))
        return float(self.predict_features({k: np.array([v]) for k, v in features.items()})[0])

    def compile(self, cache: Path) -> bool:
        """Compile the estimator for batches where its family can (LightGBM); the figures stay the same.
        True if compiled."""
        compile_ = getattr(self.estimator, "compile", None)
        return bool(compile_(cache)) if compile_ is not None else False

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "pipeline.json", {
            "name": self.name, "family": self.estimator.family, "preprocessor": self.preprocessor.to_dict(),
        })
        self.estimator.save(folder)
        return folder

    @classmethod
    def load(cls, folder: Path) -> TripDurationPipeline:
        meta = read_json(folder / "pipeline.json")
        estimator = family_class(meta["family"]).load(folder)
        return cls(meta["name"], estimator, Preprocessor.from_dict(meta["preprocessor"]))
