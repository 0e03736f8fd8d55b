"""The production profile's store: MLflow with a PostgreSQL backend (a fresh database per test run)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import mlflow
import numpy as np
import pytest
import sqlalchemy as sa

from tripcast import training
from tripcast.config import Settings
from tripcast.registry import CHAMPION, Registry, decide

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    name = f"tripcast_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"the production-profile test needs PostgreSQL on 127.0.0.1:5432 ({exc.orig})")
    yield f"{SERVER}/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_train_and_register_on_postgres(settings: Settings, postgres_uri: str) -> None:
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
