"""Batch scoring flow on real data with a real registry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tripcast import batch, training
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import MissingMonthError
from tripcast.registry import CHAMPION, Registry, decide

pytestmark = pytest.mark.slow


@pytest.fixture
def champion(settings: Settings):
    months = {m: training.read_month_data("green", m, settings)
              for m in ("2021-01", "2021-02")}
    result = training.train(months["2021-01"], months["2021-02"], "baseline", settings)
    registry = Registry(settings)
    mv = registry.register(result.model_uri, result.run_id)
    registry.apply(mv.version, decide(1.0, None, 2.0, 0.01))
    return registry.load_pipeline(CHAMPION)[1]


def test_backfill_scores_each_month_atomically(settings: Settings, prefect_server: str, champion) -> None:
    from tripcast.flows.score import score_flow

    result = score_flow("green", "2021-02", "2021-03", CHAMPION)
    assert [m["month"] for m in result["months"]] == ["2021-02", "2021-03"]
    feb = pd.read_parquet(batch.output_path("green", tlc.Month.parse("2021-02"), settings))
    assert list(feb.columns) == batch.OUTPUT_COLUMNS and len(feb) == result["months"][0]["rows"]
    assert len(feb) == 64_572 - 2  # every ride of the file but the two picked up outside February
    assert feb["ride_id"].is_unique and feb["ride_id"].iloc[0] == "green-2021-02-0"
    rides = tlc.read_month("green", "2021-02", settings).iloc[[0, 100, 5000]]
    np.testing.assert_array_equal(feb.set_index("ride_id").loc[
        ["green-2021-02-0", "green-2021-02-100", "green-2021-02-5000"], "predicted_duration"], champion.predict(rides))
    np.testing.assert_allclose(feb["diff"], feb["actual_duration"] - feb["predicted_duration"])
    assert set(feb["model_version"]) == {"1"}
    folder = batch.output_path("green", tlc.Month.parse("2021-02"), settings).parent
    assert sorted(p.name for p in folder.iterdir()) == ["2021-02.parquet", "2021-03.parquet"]  # no temp files


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    target = tmp_path / "out" / "2021-01.parquet"
    batch.write_atomic(frame, target)

    def broken(self, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        batch.write_atomic(pd.DataFrame({"a": [3]}), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["2021-01.parquet"]
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]  # the previous output is intact


def test_outputs_get_the_usual_file_mode(tmp_path: Path) -> None:
    # Written through a temporary file, but readable as any file the user writes (mkstemp's would be 0600).
    previous = os.umask(0o022)
    try:
        target = batch.write_atomic(pd.DataFrame({"a": [1]}), tmp_path / "2021-01.parquet")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_backfill_over_a_missing_month_writes_nothing(settings: Settings, prefect_server: str, champion) -> None:
    from tripcast.flows.score import score_flow

    with pytest.raises(MissingMonthError, match="no green file for 2021-04"):
        score_flow("green", "2021-02", "2021-04", CHAMPION)
    assert not batch.output_path("green", tlc.Month.parse("2021-02"), settings).parent.exists()
