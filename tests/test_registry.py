"""Training flow -> MLflow registry on the embedded profile: a real Prefect server, real MLflow (SQLite)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tripcast import training
from tripcast.config import Settings
from tripcast.errors import RegistryError
from tripcast.models import verify
from tripcast.registry import CHALLENGER, CHAMPION, Registry, decide, rolled_back
from tripcast.tracking import source_tags

pytestmark = pytest.mark.slow


def test_policy_needs_the_baseline_and_the_margin() -> None:
    assert decide(5.0, None, 7.0, 0.01).promote
    assert not decide(7.5, None, 7.0, 0.01).promote
    assert "rule baseline" in decide(7.5, None, 7.0, 0.01).reason
    assert decide(5.0, 5.2, 7.0, 0.01).promote  # 3.8 % better
    rejected = decide(5.0, 5.04, 7.0, 0.01)  # 0.8 % better: not enough
    assert not rejected.promote and "needs <= 4.9896" in rejected.reason
    tags = rejected.as_tags()
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_rmse"] == "5.04"


def test_registry_model_predicts_exactly_what_training_predicted(settings: Settings) -> None:
    months = {m: training.read_month_data("green", m, settings)
              for m in ("2021-01", "2021-02")}
    result = training.train(months["2021-01"], months["2021-02"], "lightgbm", settings)
    registry = Registry(settings)
    version = registry.register(result.model_uri, result.run_id)
    registry.apply(version.version, decide(result.val_rmse, None, result.baseline_rmse, 0.01))

    rides = months["2021-02"].rides
    pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@{CHAMPION}")
    request = rides[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]].astype(
        {"PULocationID": "int64", "DOLocationID": "int64"})
    assert np.array_equal(pyfunc.predict(request), result.val_predictions)
    _, pipeline = registry.load_pipeline(CHAMPION)
    assert np.array_equal(pipeline.predict(rides), result.val_predictions)

    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["val_rmse"] == pytest.approx(result.val_rmse) and result.val_rmse <= 5.5
    assert run.data.metrics["baseline_val_rmse"] > result.val_rmse
    assert run.data.metrics["train_dropped_pickup_outside_month"] == 3
    assert run.data.tags["tripcast.git_commit"] and run.data.tags["tripcast.version"]
    inputs = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {("green_tripdata_2021-01", "training"), ("green_tripdata_2021-02", "validation")}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/residuals.png", "plots/predicted_vs_actual.png"}
    reference = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=verify.REFERENCE_ARTIFACT)
    # Monitoring's reference: every validation ride a client could send (any duration), with its prediction.
    reference = pd.read_parquet(reference)
    inputs = months["2021-02"].inputs
    assert len(reference) == len(inputs) > len(rides) and reference["prediction"].notna().all()
    in_range = reference[reference["duration"].between(settings.min_duration, settings.max_duration)]
    assert len(in_range) == len(rides)
    assert np.allclose(np.sort(in_range["prediction"].to_numpy()), np.sort(result.val_predictions))


def test_flow_promotes_then_refuses_a_worse_challenger_and_rolls_back(settings: Settings, prefect_server: str) -> None:
    from tripcast.flows.train import train_flow

    first = train_flow("green", "2021-01", "2021-02", "lightgbm")
    assert first["promoted"] and first["alias"] == CHAMPION and first["metrics"]["val_rmse"] <= 5.5

    worse = train_flow("green", "2021-01", "2021-02", "linear")
    assert not worse["promoted"] and worse["alias"] is None and Registry(settings).current(CHALLENGER) is None
    assert "does not beat" in worse["reason"]
    registry = Registry(settings)
    assert registry.current(CHAMPION) == first["version"]
    tags = registry.version(worse["version"]).tags
    assert tags["promotion.decision"] == "rejected"
    # The MLflow UI shows the decision and its reason as the version's description.
    assert registry.version(worse["version"]).description == f"rejected: {worse['reason']}"
    assert float(tags["promotion.challenger_rmse"]) == pytest.approx(worse["metrics"]["val_rmse"], abs=1e-4)
    assert float(tags["promotion.champion_rmse"]) == pytest.approx(first["metrics"]["val_rmse"], abs=1e-4)

    # An operator overrides the policy, then rolls back: the previous champion returns.
    registry.promote(worse["version"], reason="operator test")
    assert registry.current(CHAMPION) == worse["version"]
    assert registry.version(worse["version"]).tags["promotion.previous_champion"] == first["version"]
    assert registry.rollback() == (worse["version"], first["version"])
    assert registry.current(CHAMPION) == first["version"]
    assert "rollback.at" in registry.version(worse["version"]).tags
    assert rolled_back(registry.version(worse["version"]), registry.current(CHAMPION))
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    # Promoted again after its rollback, it is champion, not "promoted (rolled back)" (`tripcast models list`).
    registry.promote(worse["version"], reason="operator test, again")
    assert not rolled_back(registry.version(worse["version"]), registry.current(CHAMPION))
    assert not rolled_back(registry.version(first["version"]), registry.current(CHAMPION))


def test_tuning_logs_each_trial_as_a_nested_run(settings: Settings, prefect_server: str) -> None:
    from tripcast.flows.train import train_flow

    result = train_flow("green", "2021-01", "2021-02", "ridge", trials=3)
    children = mlflow.search_runs(experiment_names=[settings.mlflow_experiment],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(children) == 3 and children["metrics.holdout_rmse"].notna().all()
    parent = mlflow.get_run(result["run_id"])
    assert float(parent.data.params["alpha"]) in set(children["params.alpha"].astype(float))
    assert parent.data.params["tuning_trials_done"] == "3"


def test_deployments_register_with_their_schedules(settings: Settings, prefect_server: str) -> None:
    from prefect import get_client

    from tripcast.flows.monitor import monitor_deployment
    from tripcast.flows.train import deployment

    retrain_id = deployment("0 6 5 * *", "lightgbm", "green").apply()
    monitor_id = monitor_deployment("15 * * * *").apply()
    with get_client(sync_client=True) as client:
        retrain, monitor = client.read_deployment(retrain_id), client.read_deployment(monitor_id)
    assert retrain.name == "monthly-retrain" and retrain.parameters == {"color": "green", "model": "lightgbm"}
    assert [s.schedule.cron for s in retrain.schedules] == ["0 6 5 * *"]
    assert monitor.name == "monitor" and [s.schedule.cron for s in monitor.schedules] == ["15 * * * *"]


def test_the_git_commit_recorded_is_the_packages_own(tmp_path: Path) -> None:
    # Installed in a virtual environment inside a user's project, the package used to be tagged with the
    # commit of that project: a lineage that says nothing of the code that trained.
    repo = tmp_path / "someone-elses-project"
    package = repo / ".venv" / "lib" / "tripcast"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (repo / "README").write_text("theirs")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "README")
    git("commit", "-qm", "theirs")
    assert source_tags(package)["tripcast.git_commit"] == "unknown"
    git("add", "-f", ".venv/lib/tripcast/__init__.py")  # now the package's own repository (an editable install)
    git("commit", "-qm", "ours")
    assert source_tags(package)["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    (package / "__init__.py").write_text("changed")
    assert source_tags(package)["tripcast.git_commit"] == git("rev-parse", "HEAD") + "-dirty"
