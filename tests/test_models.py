"""Model families on real data: the course's reference, the rule baseline, save/load, quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.metrics import regression_metrics
from tripcast.models import FAMILIES, TripDurationPipeline, build
from tripcast.models.base import lookup
from tripcast.models.boosted import PairStatistics, out_of_fold


def _month(settings: Settings, month: str) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    m = tlc.Month.parse(month)
    rides, _ = feats.clean(tlc.read_month("green", m, settings), 1, 60, m.start, m.end)
    return feats.Preprocessor().transform(rides), feats.targets(rides), rides


@pytest.fixture
def green_2021(settings: Settings):
    return {m: _month(settings, m) for m in ("2021-01", "2021-02", "2021-03")}


def test_linear_reproduces_the_course_reference(green_2021) -> None:
    (train_x, train_y, _), (val_x, val_y, _) = green_2021["2021-01"], green_2021["2021-02"]
    rmse = regression_metrics(val_y, build("linear").fit(train_x, train_y).predict(val_x))["rmse"]
    assert rmse == pytest.approx(7.7587, abs=0.02)


def test_rule_baseline_uses_pair_median_then_distance(green_2021) -> None:
    train_x, train_y, _ = green_2021["2021-01"]
    rule = build("baseline").fit(train_x, train_y)
    pair = train_x["zone_pair"].value_counts().index[0]
    expected = np.median(train_y[train_x["zone_pair"].to_numpy() == pair])
    unseen = pd.DataFrame({"zone_pair": [pair, 999999, 999999], "trip_distance": [2.0, 0.5, 12.3]})
    got = rule.predict(unseen)
    assert got[0] == expected
    short = (train_x["trip_distance"] < 1).to_numpy()
    assert got[1] == np.median(train_y[short])
    assert got[2] == np.median(train_y[((train_x["trip_distance"] >= 12) & (train_x["trip_distance"] < 13)).to_numpy()])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_saves_and_loads_exactly(green_2021, tmp_path: Path, name: str) -> None:
    train_x, train_y, _ = green_2021["2021-01"]
    _, _, val_rides = green_2021["2021-02"]
    params = {"n_estimators": 30} if name == "lightgbm" else {}
    pipeline = TripDurationPipeline(name, build(name, **params).fit(train_x, train_y))
    before = pipeline.predict(val_rides)
    loaded = TripDurationPipeline.load(pipeline.save(tmp_path / name))
    assert np.array_equal(loaded.predict(val_rides), before)
    assert {p.suffix for p in (tmp_path / name).iterdir()} <= {".json", ".txt"}  # no pickles


def test_lookup_defaults_for_unknown_keys() -> None:
    keys, values = np.array([3, 7, 9]), np.array([30.0, 70.0, 90.0])
    got = lookup(keys, values, np.array([7, 1, 9, 10]), np.array([-1.0, -2.0, -3.0, -4.0]))
    assert got.tolist() == [70.0, -2.0, 90.0, -4.0]
    assert lookup(np.array([], dtype=int), np.array([]), np.array([1, 2]), 5.0).tolist() == [5.0, 5.0]


@pytest.mark.slow
def test_default_boosted_model_quality(green_2021) -> None:
    """Target: RMSE <= 5.50 on 2021-02 and 2021-03 when trained on 2021-01 (the course's best tuned XGBoost: 6.30).
    The zone-pair statistics are what let 60 small trees beat the earlier 250 large ones: without them, the
    same trees are clearly worse."""
    train_x, train_y, _ = green_2021["2021-01"]
    model = build("lightgbm").fit(train_x, train_y)
    without = build("lightgbm", pair_statistics=False).fit(train_x, train_y)
    for month in ("2021-02", "2021-03"):
        val_x, val_y, _ = green_2021[month]
        rmse = regression_metrics(val_y, model.predict(val_x))["rmse"]
        assert rmse <= 5.45, month
        assert regression_metrics(val_y, without.predict(val_x))["rmse"] > rmse + 0.1, month


def test_pair_statistics_are_smoothed_means_out_of_fold() -> None:
    features = {"zone_pair": np.array([1002, 1002, 1002, 3004]), "PULocationID": np.array([1, 1, 1, 3]),
                "trip_distance": np.array([1.0, 2.0, 0.0, 4.0])}
    minutes = np.array([10.0, 20.0, 6.0, 40.0])
    stats = PairStatistics.fit(features, minutes, smoothing=2.0)
    overall = minutes.mean()
    zone1 = (36.0 + 2 * overall) / (3 + 2)
    assert stats.minutes[0] == pytest.approx((36.0 + 2 * zone1) / (3 + 2))
    pace = np.log(minutes / np.maximum(features["trip_distance"], 0.1))
    assert stats.log_pace[1] == pytest.approx((pace[3] + 2 * pace.mean()) / (1 + 2))
    unseen = stats.encode({"zone_pair": np.array([1009, 9009]), "PULocationID": np.array([1, 9])})
    assert unseen[0].tolist() == pytest.approx([zone1, overall]) and unseen[1].tolist() == [pace.mean()] * 2
    # Out of fold: a ride's own duration never enters its own statistics.
    rng = np.random.default_rng(0)
    many = {"zone_pair": rng.integers(0, 5, 400) + 1000, "PULocationID": np.ones(400, int),
            "trip_distance": np.full(400, 2.0)}
    target = rng.normal(20, 5, 400)
    shifted = target.copy()
    shifted[7] += 1000
    assert out_of_fold(many, shifted, 5.0, seed=1)[0][7] == out_of_fold(many, target, 5.0, seed=1)[0][7]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_ride_alone_predicts_what_the_batch_predicts(green_2021, name: str) -> None:
    train_x, train_y, _ = green_2021["2021-01"]
    _, _, val_rides = green_2021["2021-02"]
    params = {"n_estimators": 30} if name == "lightgbm" else {}
    pipeline = TripDurationPipeline(name, build(name, **params).fit(train_x, train_y))
    rides = pd.concat([val_rides.sample(300, random_state=3), pd.DataFrame({  # an unseen pair and zone
        "PULocationID": [265, 1], "DOLocationID": [1, 265], "trip_distance": [0.0, 199.0],
        "pickup_datetime": pd.to_datetime(["2021-02-07 23:59:59", "2021-02-08 00:00:00"])})], ignore_index=True)
    singles = [pipeline.predict_one(int(r.PULocationID), int(r.DOLocationID), float(r.trip_distance),
                                    r.pickup_datetime.to_pydatetime()) for r in rides.itertuples()]
    assert singles == pipeline.predict(rides).tolist()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_small_frame_takes_the_single_row_path_with_the_vectorised_figures(green_2021, name: str) -> None:
    """What an MLflow-compatible server sends per request (a frame of one or a few rides, pickup times as
    timestamps, ISO text with or without an offset, missing, zones as floats) predicts what the vectorised
    path predicts for the same frame."""
    train_x, train_y, _ = green_2021["2021-01"]
    _, _, val_rides = green_2021["2021-02"]
    params = {"n_estimators": 30} if name == "lightgbm" else {}
    pipeline = TripDurationPipeline(name, build(name, **params).fit(train_x, train_y))
    rides = val_rides.sample(8, random_state=5)[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]]
    text = rides.assign(pickup_datetime=[t.isoformat() for t in rides.pickup_datetime])
    aware = rides.assign(pickup_datetime=[t.tz_localize("America/New_York").tz_convert("UTC").isoformat()
                                          for t in rides.pickup_datetime])
    floats = rides.astype({"PULocationID": float, "DOLocationID": float})
    for frame in (rides, text, aware, floats, rides.head(1), text.head(3)):
        assert pipeline.preprocessor.rows(frame) is not None
        vectorised = pipeline.predict_features(pipeline.preprocessor.transform(frame))
        assert pipeline.predict(frame).tolist() == vectorised.tolist()
    assert pipeline.predict(text).tolist() == pipeline.predict(rides).tolist()
    assert pipeline.predict(aware).tolist() == pipeline.predict(rides).tolist()
    now = rides.drop(columns="pickup_datetime").head(2)  # picked up now: same hour either way (bar a tick)
    assert np.allclose(pipeline.predict(now), pipeline.predict_features(pipeline.preprocessor.transform(now)))
    assert pipeline.preprocessor.rows(rides.assign(trip_distance=[None] * 8)) is None  # left to pandas


def test_compiled_trees_predict_lightgbm_s_figures_and_a_damaged_compilation_is_rebuilt(green_2021,
                                                                                        tmp_path: Path) -> None:
    train_x, train_y, _ = green_2021["2021-01"]
    _, _, val_rides = green_2021["2021-02"]
    pipeline = TripDurationPipeline("lightgbm", build("lightgbm", n_estimators=30).fit(train_x, train_y))
    expected = pipeline.predict(val_rides).tolist()  # LightGBM's own predict
    assert pipeline.compile(tmp_path) and pipeline.estimator._compiled is not None
    assert pipeline.predict(val_rides).tolist() == expected
    (library,) = tmp_path.glob("*.so")
    library.write_bytes(library.read_bytes()[:5000])  # loaded as it is, LLVM would abort the process
    assert pipeline.compile(tmp_path) and pipeline.predict(val_rides).tolist() == expected
    assert len(library.read_bytes()) > 5000  # rebuilt
    linear = TripDurationPipeline("linear", build("linear").fit(train_x, train_y))
    assert not linear.compile(tmp_path)  # nothing to compile: its own predict


def test_lightgbm_models_saved_before_pair_statistics_still_load(green_2021, tmp_path: Path) -> None:
    """Rollback must reach versions registered by tripcast 0.1 (five features, no pair statistics)."""
    import lightgbm as lgb

    train_x, train_y, val_rides = green_2021["2021-01"]
    columns = ["PULocationID", "DOLocationID", "trip_distance", "pickup_hour", "pickup_dow"]
    booster = lgb.train({"objective": "regression", "verbosity": -1, "num_leaves": 15},
                        lgb.Dataset(train_x[columns].to_numpy(float), train_y, categorical_feature=[0, 1]), 20)
    folder = tmp_path / "v01"
    folder.mkdir()
    booster.save_model(str(folder / "lightgbm.txt"))
    (folder / "lightgbm.json").write_text(json.dumps({"params": {"num_leaves": 15}, "seed": 42}))
    (folder / "pipeline.json").write_text(json.dumps({"name": "lightgbm", "family": "lightgbm",
                                                      "preprocessor": {"timezone": "America/New_York",
                                                                       "version": 1}}))
    loaded = TripDurationPipeline.load(folder)
    rides = val_rides.head(50)
    expected = booster.predict(feats.Preprocessor().transform(rides)[columns].to_numpy(float))
    assert loaded.predict(rides).tolist() == expected.tolist()
    first = rides.iloc[0]
    assert loaded.predict_one(int(first.PULocationID), int(first.DOLocationID), float(first.trip_distance),
                              first.pickup_datetime.to_pydatetime()) == expected[0]


def test_linear_predicts_what_the_course_code_predicts(green_2021) -> None:
    """Same columns in the same order as DictVectorizer, so scikit-learn's solver takes the same path."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LinearRegression

    (train_x, train_y, train_rides), (val_x, _, val_rides) = green_2021["2021-01"], green_2021["2021-02"]

    def records(rides: pd.DataFrame) -> list[dict]:
        pair = rides["PULocationID"].astype(str) + "_" + rides["DOLocationID"].astype(str)
        return pd.DataFrame({"PU_DO": pair, "trip_distance": rides["trip_distance"]}).to_dict(orient="records")

    dv = DictVectorizer()
    course = LinearRegression().fit(dv.fit_transform(records(train_rides)), train_y)
    expected = course.predict(dv.transform(records(val_rides)))
    got = build("linear").fit(train_x, train_y).predict(val_x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
