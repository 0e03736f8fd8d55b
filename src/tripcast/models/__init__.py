"""Model families and the pipeline (preprocessor + estimator) that is saved and registered as one unit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tripcast.features import Preprocessor
from tripcast.models.base import DurationModel, read_json, write_json
from tripcast.models.baseline import ZonePairMedian
from tripcast.models.boosted import LightGBMDuration
from tripcast.models.linear import LinearDuration

# CLI name -> (class, fixed constructor arguments)
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    "baseline": (ZonePairMedian, {}),
    "linear": (LinearDuration, {"kind": "linear"}),
    "ridge": (LinearDuration, {"kind": "ridge"}),
    "lasso": (LinearDuration, {"kind": "lasso", "alpha": 0.001}),
    "lightgbm": (LightGBMDuration, {}),
}
DEFAULT_FAMILY = "lightgbm"
_CLASSES = {cls.family: cls for cls, _ in FAMILIES.values()}


def build(name: str, **params: Any) -> DurationModel:
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(FAMILIES)}")
    cls, fixed = FAMILIES[name]
    return cls(**(fixed | params))


class TripDurationPipeline:
    """Rides in, minutes out: the preprocessor and the estimator, saved together in one folder."""

    def __init__(self, name: str, estimator: DurationModel, preprocessor: Preprocessor | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.preprocessor = preprocessor or Preprocessor()

    def predict(self, rides: pd.DataFrame) -> np.ndarray:
        return self.predict_features(self.preprocessor.transform(rides))

    def predict_features(self, features: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.estimator.predict(features), dtype=np.float64)

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
        estimator = _CLASSES[meta["family"]].load(folder)
        return cls(meta["name"], estimator, Preprocessor.from_dict(meta["preprocessor"]))
