"""The production profile's store: MLflow with a PostgreSQL backend (a fresh database per test run)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import sqlalchemy as sa

from tripcast import training
from tripcast.config import Settings
from tripcast.registry import CHAMPION, Registry, decide

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_train_and_register_on_postgres(settings: Settings, postgres_database) -> None:
    postgres_uri = postgres_database()
    prod = settings.with_overrides(tracking_uri=postgres_uri)
    months = {m: training.read_month_data("green", m, prod)
              for m in ("2021-01", "2021-02")}
    result = training.train(months["2021-01"], months["2021-02"], "lightgbm", prod)
    registry = Registry(prod)
    version = registry.register(result.model_uri, result.run_id)
    registry.apply(version.version, decide(result.val_rmse, None, result.baseline_rmse, prod.promotion_margin))

    # The run, its metrics and the alias live in PostgreSQL, not in a local file.
    engine = sa.create_engine(postgres_uri)
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT run_uuid FROM runs")).scalars().all()
        val_rmse = conn.execute(sa.text("SELECT value FROM latest_metrics WHERE key = 'val_rmse'")).scalar_one()
        alias = conn.execute(sa.text("SELECT version FROM registered_model_aliases WHERE alias = :a"),
                             {"a": CHAMPION}).scalar_one()
    engine.dispose()
    assert runs == [result.run_id] and val_rmse == pytest.approx(result.val_rmse) and str(alias) == "1"
    assert not (prod.mlflow_dir / "mlflow.db").exists()

    _, pipeline = registry.load_pipeline(CHAMPION)
    assert np.array_equal(pipeline.predict(months["2021-02"].rides), result.val_predictions)
    mlflow.set_tracking_uri(None)
