"""What every model family shares: the interface, JSON files, and a vectorised key lookup."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import pandas as pd


class DurationModel(Protocol):
    family: ClassVar[str]

    def fit(self, features: pd.DataFrame, target: np.ndarray) -> Self: ...

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def params(self) -> dict[str, Any]: ...

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path) -> Self: ...


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: float | np.ndarray) -> np.ndarray:
    """values[keys == q] for each q (keys sorted, unique); ``default`` where q is not a key."""
    if len(keys) == 0:
        return np.broadcast_to(np.asarray(default, dtype=np.float64), query.shape).copy()
    position = np.searchsorted(keys, query).clip(0, len(keys) - 1)
    found = keys[position] == query
    return np.where(found, values[position], default)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
