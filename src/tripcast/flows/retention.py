"""The retention flow: the prediction log's rides older than TRIPCAST_RETENTION_DAYS, moved to parquet."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.deployments.runner import EntrypointType

from tripcast import locks
from tripcast.config import load_settings
from tripcast.flows import say
from tripcast.monitoring.retention import archive_predictions, cut_for
from tripcast.store import shared


@flow(name="retention")
def retention_flow(now: datetime | None = None) -> dict[str, Any]:
    """Archive logged predictions with a pickup before the retention cut (``now``: New York time, default now)."""
    settings = load_settings()
    if settings.retention_days is None:
        say("retention: TRIPCAST_RETENTION_DAYS is not set, the prediction log keeps every ride")
        return {"cut": None, "rows": 0, "files": []}
    cut = cut_for(now or datetime.now(), settings.retention_days, settings.window)
    say(f"retention: moving rides picked up before {cut:%Y-%m-%d} to {settings.archive_dir}")
    with locks.exclusive("retention", settings, stores=(settings.resolved_monitoring_uri,)):
        done = archive_predictions(shared(settings.resolved_monitoring_uri), settings.archive_dir, cut)
    say(f"retention: {done.rows:,} rides archived in {len(done.files)} files")
    return {"cut": cut.isoformat(), "rows": done.rows, "files": [str(f) for f in done.files]}


def retention_deployment(cron: str, name: str = "retention"):
    return retention_flow.to_deployment(name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
                                        description="Move logged predictions past the retention period to parquet.")
