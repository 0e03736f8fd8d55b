"""Which model answers a ride: champion only, an A/B split sticky per ride_id, or shadow."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from tripcast.errors import TripcastError
from tripcast.registry import Registry

log = logging.getLogger(__name__)

CHAMPION_ARM, CHALLENGER_ARM = "champion", "challenger"


def _digest(ride_id: str) -> bytes:
    return hashlib.blake2b(ride_id.encode(), digest_size=8).digest()


def bucket(ride_id: str) -> float:
    """A stable number in [0, 1) per ride_id: the same ride always lands in the same arm."""
    return int.from_bytes(_digest(ride_id), "big") / 2**64


def buckets(ride_ids: list[str]) -> np.ndarray:
    """``bucket`` of many ride_ids at once (the same figures: both round the same 64-bit integer)."""
    return np.frombuffer(b"".join([_digest(i) for i in ride_ids]), dtype=">u8") / 2.0**64


@dataclass(frozen=True)
class TrafficPolicy:
    mode: str  # champion | ab | shadow
    challenger_weight: float
    experiment: str | None = None  # the experiment (or guard) that asks for it, as "<kind> <id>"

    @property
    def uses_challenger(self) -> bool:
        return self.mode in ("ab", "shadow")

    def arm(self, ride_id: str, challenger_ready: bool) -> str:
        if self.mode == "ab" and challenger_ready and bucket(ride_id) < self.challenger_weight:
            return CHALLENGER_ARM
        return CHAMPION_ARM

    def arms(self, ride_ids: list[str], challenger_ready: bool) -> np.ndarray:
        """``arm`` of many rides at once."""
        if self.mode == "ab" and challenger_ready:
            return np.where(buckets(ride_ids) < self.challenger_weight, CHALLENGER_ARM, CHAMPION_ARM)
        return np.full(len(ride_ids), CHAMPION_ARM)

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"


CHAMPION_ONLY = TrafficPolicy("champion", 0.0)


class TrafficFollower:
    """The traffic policy the running experiment (or guard) recorded on the registry, followed like an alias: at
    every poll of the alias watcher and at ``/admin/reload``. Without an experiment, ``default`` (the
    TRIPCAST_TRAFFIC_MODE setting). Whoever answers reads ``policy`` once per request."""

    def __init__(self, registry: Registry, default: TrafficPolicy) -> None:
        self.registry = registry
        self.default = default
        self.policy = default
        self.last_error: str | None = None

    def refresh(self) -> bool:
        """Read what the registry asks for; True if the policy changed."""
        try:
            wanted = self.registry.traffic()
        except TripcastError as exc:  # the registry down: keep the policy; the holders say it already
            self.last_error = str(exc)[:500]
            return False
        self.last_error = None
        policy = self.default if wanted is None else TrafficPolicy(
            wanted["mode"], float(wanted.get("weight") or 0), f"{wanted.get('kind', 'experiment')} {wanted.get('id')}")
        if policy == self.policy:
            return False
        log.info("traffic: %s%s", policy.mode, f" ({policy.experiment})" if policy.experiment else "")
        self.policy = policy  # one reference assignment: a request sees the old policy or the new one
        return True
