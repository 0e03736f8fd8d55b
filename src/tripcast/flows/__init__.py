"""Prefect flows that compose the core: train (load -> validate -> features -> train -> register and judge),
evaluate, score (batch), monitor and retrain, and the quick start."""

from __future__ import annotations

import asyncio
import os
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

from tripcast.errors import DataError


def retry_unless_data_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry the unexpected (a full disk, a killed process), not data errors. A
    missing month or a corrupt file will not mend, and the data layer already retries the network."""
    return not isinstance(state.data, DataError)


def prepare_local_prefect(home: Path) -> None:
    """Without a Prefect server (PREFECT_API_URL), each run starts Prefect's local one on the database in
    ``home``: migrate that database once, under a file lock, first. Runs sharing a home raced in their
    migrations ("Online migration expected to match one row"), and the loser still exited 0."""
    if os.environ.get("PREFECT_API_URL"):
        return
    marker = home / f".tripcast-migrated-{version('prefect')}"
    if marker.exists() and (home / "prefect.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".tripcast-migrate.lock", timeout=600):
        if marker.exists() and (home / "prefect.db").exists():
            return
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())
        marker.touch()
