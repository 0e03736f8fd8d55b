"""Ground truth from a published TLC month: its actual durations, keyed like batch scoring and replays
(``<colour>-<YYYY-MM>-<row in the file>``), joined to the logged predictions by ride_id."""

from __future__ import annotations

from tripcast import features as feats
from tripcast.batch import scorable_month
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.store import record_labels, shared


def month_labels(color: str, month: str | tlc.Month, settings: Settings) -> list[dict]:
    rides, _ = scorable_month(color, tlc.Month.parse(month), settings)
    return [{"ride_id": ride_id, "actual_duration": float(duration)}
            for ride_id, duration in zip(rides["ride_id"], feats.duration_minutes(rides), strict=True)]


def join_month(color: str, month: str | tlc.Month, settings: Settings) -> dict:
    """Store a month's actual durations as labels; returns counts, matched and unknown."""
    result = record_labels(shared(settings.resolved_monitoring_uri), month_labels(color, month, settings),
                           "month")
    return {"stored": result["stored"], "matched": result["stored"] - len(result["unknown"]),
            "unknown": len(result["unknown"])}
