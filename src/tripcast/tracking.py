"""Point MLflow at the configured tracking store (embedded SQLite + local artifacts, or production)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import tripcast
from tripcast.config import Settings


def mlflow_client(settings: Settings) -> MlflowClient:
    """Set tracking and registry URIs; returns a client. No request yet: the store may be down (serving starts
    anyway, and says so)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not settings.tracking_uri:
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    uri = settings.resolved_tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def configure(settings: Settings) -> MlflowClient:
    """``mlflow_client``, and the experiment that runs are logged to, made if it does not exist yet."""
    client = mlflow_client(settings)
    if client.get_experiment_by_name(settings.experiment) is None:
        client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    mlflow.set_experiment(settings.experiment)
    return client


def source_tags(package: Path | None = None) -> dict[str, str]:
    """Git commit (with a -dirty suffix for uncommitted changes) and package version for lineage. The commit
    is only the package's own: installed in a virtual environment inside some other repository (a user's
    project), the package's files are not tracked there, and that repository's commit would be a false lineage.
    """
    folder = package or Path(tripcast.__file__).parent
    try:
        # Fails (exit status 1) unless this very file is tracked by the repository around it.
        subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=folder, capture_output=True,
                       timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"mlflow.source.git.commit": commit, "tripcast.git_commit": commit,
            "tripcast.version": tripcast.__version__}
