"""Point MLflow at the configured tracking store (embedded SQLite + local artifacts, or production)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

import tripcast
from tripcast import locks
from tripcast.config import Settings
from tripcast.errors import RegistryUnavailableError
from tripcast.files import atomic_path

_ready: set[str] = set()  # tracking URIs this process has found answering (and, for databases, created)


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


def require_registry(settings: Settings) -> None:
    """Before any work: the registry answers within ``registry_wait_seconds``, else one error naming its address
    (a command then exits 2 instead of loading data and retrying for minutes). A database store is created
    here, once, under a lock: MLflow's schema creation raced itself when several runs met a new database."""
    uri = settings.resolved_tracking_uri
    if uri in _ready:
        return
    deadline = time.monotonic() + settings.registry_wait_seconds
    while True:
        try:
            _probe(uri, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            break
        except (requests.RequestException, OSError, ValueError, RuntimeError) as exc:
            if time.monotonic() >= deadline:
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise RegistryUnavailableError(
                    f"the registry at {_redacted(uri)} does not answer after {settings.registry_wait_seconds:g} s "
                    f"({reason}); is it running? (TRIPCAST_TRACKING_URI; TRIPCAST_REGISTRY_WAIT_SECONDS sets the "
                    "wait)") from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if not uri.startswith(("http://", "https://", "databricks")):
        with locks.exclusive("mlflow-store", settings, stores=(uri,)):
            _create_sqlite_store(uri, settings)
            client = mlflow_client(settings)
            client.search_experiments(max_results=1)  # makes the tracking tables, if missing
            client.search_registered_models(max_results=1)  # and the registry's
    _ready.add(uri)


def _create_sqlite_store(uri: str, settings: Settings) -> None:
    """A new SQLite store is migrated beside its path and renamed into place: a Ctrl-C during MLflow's
    migrations left a half-made database that failed every later command ("duplicate column name: step")."""
    url = make_url(uri)
    if url.get_backend_name() != "sqlite" or not url.database or Path(url.database).exists():
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore  # makes all of MLflow's tables

    settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(url.database)) as tmp:
        SqlAlchemyStore(url.set(database=str(tmp)).render_as_string(hide_password=False)).engine.dispose()


def _probe(uri: str, timeout: float) -> None:
    """One attempt to reach the tracking server or database; raises if it does not answer."""
    if uri.startswith(("http://", "https://")):
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code}")
    elif not uri.startswith(("sqlite", "databricks", "file:")) and "://" in uri:
        engine = create_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": max(1, int(timeout))})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # SQLAlchemy's OperationalError: its first line names the cause
            raise RuntimeError(str(getattr(exc, "orig", exc)).strip() or type(exc).__name__) from None
        finally:
            engine.dispose()


def _redacted(uri: str) -> str:
    """The address without a password (errors are printed and logged)."""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        host = parts.hostname or ""
        netloc = (f"{parts.username}:***@" if parts.password else "") + host + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:
        return uri.split("@")[-1]


def configure(settings: Settings) -> MlflowClient:
    """``mlflow_client``, and the experiment that runs are logged to, made if it does not exist yet."""
    client = mlflow_client(settings)
    if client.get_experiment_by_name(settings.mlflow_experiment) is None:
        try:
            client.create_experiment(settings.mlflow_experiment, artifact_location=settings.artifact_location)
        except MlflowException as exc:  # another run made it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(settings.mlflow_experiment)
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
