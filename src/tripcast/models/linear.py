"""The course's reference model: one-hot zone pair + distance, LinearRegression (or ridge / lasso).

The one-hot matrix is built by scikit-learn's OneHotEncoder from an integer pair code (vectorised), not
from per-row dicts. Prediction needs no sparse matrix: intercept + coefficient of the pair + slope * miles,
so the saved model is a few arrays in JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import Lasso, LinearRegression, Ridge
from sklearn.preprocessing import OneHotEncoder

from tripcast.models.base import lookup, read_json, write_json


class LinearDuration:
    family: ClassVar[str] = "linear"
    KINDS: ClassVar[tuple[str, ...]] = ("linear", "ridge", "lasso")

    def __init__(self, kind: str = "linear", alpha: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown linear kind {kind!r}")
        self.kind = kind
        self.alpha = float(alpha)
        self.pairs = np.empty(0, dtype=np.int64)
        self.pair_coefs = np.empty(0, dtype=np.float64)
        self.distance_coef = 0.0
        self.intercept = 0.0

    def _estimator(self):
        if self.kind == "ridge":
            return Ridge(alpha=self.alpha)
        if self.kind == "lasso":
            return Lasso(alpha=self.alpha, max_iter=5000)
        return LinearRegression()

    def fit(self, features: pd.DataFrame, target: np.ndarray) -> Self:
        encoder = OneHotEncoder(handle_unknown="ignore", dtype=np.float64)
        onehot = encoder.fit_transform(features[["zone_pair"]].to_numpy())
        distance = sp.csr_matrix(features[["trip_distance"]].to_numpy(dtype=np.float64))
        estimator = self._estimator().fit(sp.hstack([onehot, distance], format="csr"), target)
        self.pairs = encoder.categories_[0].astype(np.int64)
        self.pair_coefs = estimator.coef_[:-1].astype(np.float64)
        self.distance_coef = float(estimator.coef_[-1])
        self.intercept = float(estimator.intercept_)
        return self

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        pair_effect = lookup(self.pairs, self.pair_coefs, features["zone_pair"].to_numpy(), 0.0)
        return self.intercept + pair_effect + self.distance_coef * features["trip_distance"].to_numpy()

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind} | ({"alpha": self.alpha} if self.kind != "linear" else {})

    def save(self, folder: Path) -> None:
        write_json(folder / "linear.json", {
            "kind": self.kind, "alpha": self.alpha, "pairs": self.pairs.tolist(),
            "pair_coefs": self.pair_coefs.tolist(), "distance_coef": self.distance_coef,
            "intercept": self.intercept,
        })

    @classmethod
    def load(cls, folder: Path) -> Self:
        data = read_json(folder / "linear.json")
        model = cls(kind=data["kind"], alpha=data["alpha"])
        model.pairs = np.asarray(data["pairs"], dtype=np.int64)
        model.pair_coefs = np.asarray(data["pair_coefs"], dtype=np.float64)
        model.distance_coef, model.intercept = data["distance_coef"], data["intercept"]
        return model
