"""The default model: LightGBM on the ride's features plus two statistics of its zone pair.

The zone pair carries most of what a ride's duration depends on, and 265 x 265 pairs are too many for trees to
learn one split at a time. So the model first learns, per pair, the smoothed mean duration and the smoothed
mean log pace (minutes per mile) of its training rides, and gives both to the trees as features. The
statistics a tree sees while training are computed out of fold, so they never include the ride's own
duration. With them, 60 trees of 63 leaves beat the 250 trees of 127 leaves the model needed without them,
on every month tried (see bench/RESULTS.md), at a seventh of the inference cost.

Saved as LightGBM's text format plus JSON, so loading it executes no pickled code. ``predict_one`` scores a
single ride through LightGBM's single-row C entry point: the Python ``Booster.predict`` spends more on
checking its input than on the trees for one row, and one row is what the online API sends.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import lightgbm as lgb
import numpy as np
import pandas as pd
from lightgbm.basic import _LIB, _safe_call

from tripcast.models.base import lookup, read_json, write_json

RIDE_FEATURES = ["PULocationID", "DOLocationID", "trip_distance", "pickup_hour", "pickup_dow"]
FEATURES = RIDE_FEATURES + ["pair_minutes", "pair_log_pace"]
CATEGORICAL = [0, 1]  # positions of the zone columns in FEATURES
MIN_PACE_DISTANCE = 0.1  # miles: a zero-distance ride has no pace; treat it as a tenth of a mile

# Chosen on green 2021, 2022 and 2023 (train on January, validate on February and March); see RESULTS.md.
DEFAULT_PARAMS: dict[str, Any] = {
    "num_leaves": 63,
    "learning_rate": 0.15,
    "n_estimators": 60,
    "min_data_in_leaf": 30,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "cat_smooth": 20.0,
    "min_data_per_group": 50,
    "lambda_l2": 0.0,
    "pair_statistics": True,  # False: the ride's features alone (for comparison)
    "pair_smoothing": 5.0,  # pseudo-rides pulling a pair's statistics towards its pickup zone's (or all rides')
}
FOLDS = 5


@dataclass(frozen=True)
class PairStatistics:
    """Per zone pair: mean duration and mean log pace, each shrunk towards a prior by ``smoothing`` rides.
    The duration's prior is the pickup zone's (itself shrunk towards all rides'); the pace's is all rides'."""

    pairs: np.ndarray  # sorted zone_pair keys
    minutes: np.ndarray
    log_pace: np.ndarray
    zones: np.ndarray  # sorted pickup zones
    zone_minutes: np.ndarray
    mean_minutes: float
    mean_log_pace: float

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray], target: np.ndarray, smoothing: float) -> PairStatistics:
        return cls.from_sums(pair_sums(features, target), smoothing)

    @classmethod
    def from_sums(cls, sums: pd.DataFrame, smoothing: float) -> PairStatistics:
        """From per-pair sums (``pair_sums``: indexed by zone pair; minutes, log_pace, rides), wherever they were
        added up: in this process, or by a cluster's groupby (tripcast.cluster.training)."""
        sums = sums[sums["rides"] > 0].sort_index()
        rides = float(sums["rides"].sum())
        mean_minutes, mean_log_pace = float(sums["minutes"].sum()) / rides, float(sums["log_pace"].sum()) / rides
        zones = sums.groupby(sums.index.to_numpy(np.int64) // 1000)[["minutes", "rides"]].sum()
        zone_minutes = (zones["minutes"] + smoothing * mean_minutes) / (zones["rides"] + smoothing)
        prior = zone_minutes.reindex(sums.index.to_numpy(np.int64) // 1000).to_numpy()
        weight = sums["rides"].to_numpy(np.float64) + smoothing
        return cls(sums.index.to_numpy(np.int64), (sums["minutes"].to_numpy() + smoothing * prior) / weight,
                   (sums["log_pace"].to_numpy() + smoothing * mean_log_pace) / weight,
                   zones.index.to_numpy(np.int64), zone_minutes.to_numpy(np.float64), mean_minutes, mean_log_pace)

    def encode(self, features: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(pair_minutes, pair_log_pace) per ride; an unseen pair gets its pickup zone's or all rides' figures."""
        pair = np.asarray(features["zone_pair"], dtype=np.int64)
        zone_minutes = lookup(self.zones, self.zone_minutes, np.asarray(features["PULocationID"], dtype=np.int64),
                              self.mean_minutes)
        return (lookup(self.pairs, self.minutes, pair, zone_minutes),
                lookup(self.pairs, self.log_pace, pair, self.mean_log_pace))

    def to_dict(self) -> dict:
        return {"pairs": self.pairs.tolist(), "minutes": self.minutes.tolist(), "log_pace": self.log_pace.tolist(),
                "zones": self.zones.tolist(), "zone_minutes": self.zone_minutes.tolist(),
                "mean_minutes": self.mean_minutes, "mean_log_pace": self.mean_log_pace}

    @classmethod
    def from_dict(cls, data: dict) -> PairStatistics:
        arrays = {k: np.asarray(data[k], dtype=np.int64 if k in ("pairs", "zones") else np.float64)
                  for k in ("pairs", "minutes", "log_pace", "zones", "zone_minutes")}
        return cls(**arrays, mean_minutes=data["mean_minutes"], mean_log_pace=data["mean_log_pace"])


def pair_sums(features: Mapping[str, np.ndarray], target: np.ndarray) -> pd.DataFrame:
    """Per zone pair: the sum of durations, the sum of log paces and the number of rides."""
    frame = pd.DataFrame({"pair": np.asarray(features["zone_pair"], dtype=np.int64), "minutes": target,
                          "log_pace": log_pace(target, np.asarray(features["trip_distance"]))})
    return frame.groupby("pair").agg(minutes=("minutes", "sum"), log_pace=("log_pace", "sum"),
                                     rides=("minutes", "size"))


def log_pace(minutes: np.ndarray, distance: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(minutes, 1e-3) / np.maximum(np.nan_to_num(distance), MIN_PACE_DISTANCE))


def out_of_fold(features: Mapping[str, np.ndarray], target: np.ndarray, smoothing: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each training ride's pair statistics from the other folds only, so a tree never sees its own target."""
    fold = np.random.default_rng(seed).integers(0, FOLDS, len(target))
    minutes, log_pace = np.empty(len(target)), np.empty(len(target))
    columns = {k: np.asarray(features[k]) for k in ("zone_pair", "PULocationID", "trip_distance")}
    for k in range(FOLDS):
        held = fold == k
        stats = PairStatistics.fit({c: v[~held] for c, v in columns.items()}, target[~held], smoothing)
        minutes[held], log_pace[held] = stats.encode({c: v[held] for c, v in columns.items()})
    return minutes, log_pace


# The same library, called without releasing the GIL. A single row takes ~3 us; releasing the GIL for it
# hands the GIL to any thread waiting (the prediction log's writer), and winning it back took ~1.7 ms per
# call in a test with one busy thread.
_LIB_HOLDING_GIL = ctypes.PyDLL(_LIB._name)


class _SingleRow:
    """LightGBM's ``LGBM_BoosterPredictForMatSingleRowFast``: a prediction for one row of float64 features,
    set up once per booster. Thread-safe (LightGBM locks the booster per call; buffers are per call)."""

    def __init__(self, booster: lgb.Booster) -> None:
        self.columns = booster.num_feature()
        self.handle = ctypes.c_void_p()
        _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(-1),  # normal prediction, all trees
            ctypes.c_int(1), ctypes.c_int32(self.columns), ctypes.c_char_p(b"num_threads=1"),  # 1 = float64
            ctypes.byref(self.handle)))
        self._row = ctypes.c_double * self.columns
        self._booster = booster  # the handle is only valid while the booster lives

    def predict(self, values: list[float]) -> float:
        result, length = ctypes.c_double(), ctypes.c_int64()
        _safe_call(_LIB_HOLDING_GIL.LGBM_BoosterPredictForMatSingleRowFast(
            self.handle, self._row(*values), ctypes.byref(length), ctypes.byref(result)))
        return result.value

    def __del__(self) -> None:
        if self.handle:
            _LIB.LGBM_FastConfigFree(self.handle)


class LightGBMDuration:
    family: ClassVar[str] = "lightgbm"

    def __init__(self, seed: int = 42, threads: int = 2, **params: Any) -> None:
        self.hyperparams = DEFAULT_PARAMS | params
        self.seed = seed
        self.threads = threads
        self.booster: lgb.Booster | None = None
        self.pair_stats: PairStatistics | None = None
        self._single: _SingleRow | None = None
        self._compiled: Callable[[np.ndarray], np.ndarray] | None = None  # see ``compile``
        self._pair_rows: dict[int, tuple[float, float]] = {}
        self._zone_minutes: dict[int, float] = {}

    @staticmethod
    def _matrix(features: Mapping[str, np.ndarray], pair_stats: tuple[np.ndarray, ...] = ()) -> np.ndarray:
        columns = [features[name] for name in RIDE_FEATURES] + list(pair_stats)
        return np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])

    def fit(self, features: pd.DataFrame, target: np.ndarray) -> Self:
        params = dict(self.hyperparams)
        rounds = int(params.pop("n_estimators"))
        smoothing = float(params.pop("pair_smoothing"))
        with_pairs = bool(params.pop("pair_statistics"))
        params |= {"objective": "regression", "seed": self.seed, "num_threads": self.threads,
                   "deterministic": True, "verbosity": -1}
        pair_stats = out_of_fold(features, target, smoothing, self.seed) if with_pairs else ()
        data = lgb.Dataset(self._matrix(features, pair_stats), label=target,
                           feature_name=FEATURES if with_pairs else RIDE_FEATURES, categorical_feature=CATEGORICAL,
                           free_raw_data=True)
        self._set(lgb.train(params, data, num_boost_round=rounds),
                  PairStatistics.fit(features, target, smoothing) if with_pairs else None)
        return self

    @classmethod
    def from_booster(cls, booster: lgb.Booster, pair_stats: PairStatistics | None, seed: int = 42,
                     **params: Any) -> Self:
        """A model whose trees were grown elsewhere (lightgbm.dask on a cluster): the same plain model."""
        model = cls(seed=seed, **params)
        model._set(booster, pair_stats)
        return model

    def __getstate__(self) -> dict:
        # Sent to Dask workers for batch scoring: the trees as LightGBM's text, rebuilt there; the C handles stay.
        return {"params": self.hyperparams, "seed": self.seed, "threads": self.threads,
                "trees": self.booster.model_to_string() if self.booster else None, "pair_stats": self.pair_stats}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["seed"], state["threads"], **state["params"])
        if state["trees"] is not None:
            self._set(lgb.Booster(model_str=state["trees"]), state["pair_stats"])

    def _set(self, booster: lgb.Booster, pair_stats: PairStatistics | None) -> None:
        self.booster, self.pair_stats = booster, pair_stats
        self._single = _SingleRow(booster)
        self._compiled = None
        if pair_stats is not None:  # the same figures as ``encode``, as dictionaries for one ride at a time
            self._pair_rows = dict(zip(pair_stats.pairs.tolist(),
                                       zip(pair_stats.minutes.tolist(), pair_stats.log_pace.tolist(), strict=True),
                                       strict=True))
            self._zone_minutes = dict(zip(pair_stats.zones.tolist(), pair_stats.zone_minutes.tolist(), strict=True))

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError("model is not fitted")
        matrix = self._matrix(features, self.pair_stats.encode(features) if self.pair_stats else ())
        if self._compiled is not None:
            return self._compiled(matrix)
        # Threads cost more than they save on a handful of rows.
        return self.booster.predict(matrix, num_threads=self.threads if len(matrix) >= 1000 else 1)

    def compile(self, cache: Path) -> bool:
        """Predict batches with the trees compiled to native code (``tripcast.models.compiled``), once they
        give LightGBM's figures on probe rides: known and unseen zone pairs, any hour, day and distance. True
        if compiled."""
        if self.booster is None:
            raise RuntimeError("model is not fitted")
        from tripcast.models.compiled import compile_booster

        rng = np.random.default_rng(0)
        n = 2000
        pu, do = rng.integers(1, 266, n), rng.integers(1, 266, n)
        if self.pair_stats is not None and len(self.pair_stats.pairs):
            known = rng.choice(self.pair_stats.pairs, n // 2)
            pu[: n // 2], do[: n // 2] = known // 1000, known % 1000
        probe = {"PULocationID": pu, "DOLocationID": do, "zone_pair": pu * 1000 + do,
                 "trip_distance": np.round(rng.exponential(3.0, n), 2), "pickup_hour": rng.integers(0, 24, n),
                 "pickup_dow": rng.integers(0, 7, n)}
        matrix = self._matrix(probe, self.pair_stats.encode(probe) if self.pair_stats else ())
        self._compiled = compile_booster(self.booster, matrix, cache)
        return self._compiled is not None

    def predict_one(self, features: Mapping[str, float]) -> float:
        """One ride, the same figure as ``predict`` (same trees, same statistics, float64 throughout)."""
        if self._single is None:
            raise RuntimeError("model is not fitted")
        row = [features[name] for name in RIDE_FEATURES]
        if self.pair_stats is not None:
            stats = self._pair_rows.get(features["zone_pair"])
            row += stats or (self._zone_minutes.get(features["PULocationID"], self.pair_stats.mean_minutes),
                             self.pair_stats.mean_log_pace)
        return self._single.predict(row)

    def params(self) -> dict[str, Any]:
        return dict(self.hyperparams)

    def save(self, folder: Path) -> None:
        if self.booster is None:
            raise RuntimeError("model is not fitted")
        self.booster.save_model(str(folder / "lightgbm.txt"))
        write_json(folder / "lightgbm.json", {"params": self.hyperparams, "seed": self.seed,
                                              "pair_statistics": self.pair_stats.to_dict() if self.pair_stats
                                              else None})

    @classmethod
    def load(cls, folder: Path) -> Self:
        meta = read_json(folder / "lightgbm.json")
        # Without pair statistics: trained without them, or saved by tripcast 0.1 (rollback must reach those).
        stats = meta.get("pair_statistics")
        return cls.from_booster(lgb.Booster(model_file=str(folder / "lightgbm.txt")),
                                PairStatistics.from_dict(stats) if stats else None, meta["seed"], **meta["params"])
