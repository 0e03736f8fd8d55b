"""The course's reference model: one-hot zone pair + distance, LinearRegression (or ridge / lasso).

The one-hot matrix is built directly from an integer pair code (vectorised), not from per-row dicts, with
its columns in the order DictVectorizer gives them ("PU_DO=<pu>_<do>" sorted as text, then trip_distance).
The order matters: scikit-learn solves a sparse LinearRegression with lsqr, which stops at its default
tolerance before the least-squares optimum on this data (the course's 7.7587 on green 2021-02; the exact
optimum is 7.4808), and where it stops depends on the column order. Same columns, same rows, same answer.

Prediction needs no sparse matrix: intercept + coefficient of the pair + slope * miles, so the saved model
is a few arrays in JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import Lasso, LinearRegression, Ridge

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
        pair = np.asarray(features["zone_pair"])
        pairs, row_pair = np.unique(pair, return_inverse=True)
        labels = np.char.add(np.char.add((pairs // 1000).astype(str), "_"), (pairs % 1000).astype(str))
        text_order = np.argsort(labels, kind="stable")  # DictVectorizer's column order
        column_of_pair = np.empty_like(text_order)
        column_of_pair[text_order] = np.arange(len(pairs))
        n, p = len(pair), len(pairs)
        # Row i: a 1 in its pair's column, then its distance in the last column.
        columns = np.stack([column_of_pair[row_pair], np.full(n, p)], axis=1).ravel()
        values = np.stack([np.ones(n), features["trip_distance"].to_numpy(dtype=np.float64)], axis=1).ravel()
        matrix = sp.csr_matrix((values, columns, np.arange(0, 2 * n + 1, 2)), shape=(n, p + 1))
        estimator = self._estimator().fit(matrix, target)
        self.pairs = pairs.astype(np.int64)
        self.pair_coefs = estimator.coef_[column_of_pair].astype(np.float64)
        self.distance_coef = float(estimator.coef_[-1])
        self.intercept = float(estimator.intercept_)
        return self

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        pair_effect = lookup(self.pairs, self.pair_coefs, np.asarray(features["zone_pair"]), 0.0)
        return self.intercept + pair_effect + self.distance_coef * np.asarray(features["trip_distance"])

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
