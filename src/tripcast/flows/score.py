"""Batch scoring as a Prefect flow: one month, or a backfill over a range of months."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from tripcast import batch
from tripcast.cluster import cluster_of
from tripcast.config import Settings, load_settings
from tripcast.data import tlc
from tripcast.flows import retry_unless_data_error
from tripcast.models import TripDurationPipeline
from tripcast.registry import CHAMPION, Registry
from tripcast.tracking import require_registry


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_data_error, cache_policy=NONE)
def score_month(color: str, month: tlc.Month, pipeline: TripDurationPipeline, version: str,
                settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    rides, drops = batch.scorable_month(color, month, settings)
    scored = batch.score_rides(rides, pipeline, version)
    path = batch.write_atomic(scored, batch.output_path(color, month, settings))
    seconds = time.perf_counter() - started
    get_run_logger().info("%s %s: %d rides scored in %.2f s -> %s", color, month, len(scored), seconds, path)
    return {"month": str(month), "rows": len(scored), "skipped": drops.rows_in - drops.rows_out,
            "seconds": round(seconds, 3), "rows_per_second": round(len(scored) / seconds), "path": str(path)}


@task(cache_policy=NONE)
def score_on_cluster(client: Any, color: str, months: list[tlc.Month], pipeline: TripDurationPipeline, version: str,
                     settings: Settings) -> list[dict[str, Any]]:
    from tripcast.cluster.scoring import score_months

    results = score_months(client, color, months, pipeline, version, settings)
    for item in results:
        get_run_logger().info("%s %s: %d rides scored on the cluster -> %s", color, item["month"], item["rows"],
                              item["path"])
    return results


@flow(name="score")
def score_flow(color: str = "green", month: str = "2021-03", last_month: str | None = None,
               alias: str = CHAMPION) -> dict[str, Any]:
    """Score every month from ``month`` to ``last_month`` (inclusive) with the model behind ``alias``."""
    settings = load_settings()
    tlc.check_color(color)
    months = tlc.month_range(month, last_month or month)
    require_registry(settings)
    with cluster_of(settings) as client:  # a cluster that cannot do the work is said before anything is read
        mv, pipeline = Registry(settings).load_pipeline(alias)
        for m in months:  # every month at hand before any is written: a backfill fails whole, not half-way
            tlc.fetch(color, m, settings)
        if client is None:
            results = [score_month(color, m, pipeline, str(mv.version), settings) for m in months]
        else:
            results = score_on_cluster(client, color, months, pipeline, str(mv.version), settings)
    return {"color": color, "alias": alias, "version": str(mv.version), "months": results}
