"""Which model answers a ride: champion only, an A/B split sticky per ride_id, or shadow."""

from __future__ import annotations

import hashlib

import numpy as np

CHAMPION_ARM, CHALLENGER_ARM = "champion", "challenger"


def _digest(ride_id: str) -> bytes:
    return hashlib.blake2b(ride_id.encode(), digest_size=8).digest()


def bucket(ride_id: str) -> float:
    """A stable number in [0, 1) per ride_id: the same ride always lands in the same arm."""
    return int.from_bytes(_digest(ride_id), "big") / 2**64


def buckets(ride_ids: list[str]) -> np.ndarray:
    """``bucket`` of many ride_ids at once (the same figures: both round the same 64-bit integer)."""
    return np.frombuffer(b"".join([_digest(i) for i in ride_ids]), dtype=">u8") / 2.0**64


class TrafficPolicy:
    def __init__(self, mode: str, challenger_weight: float) -> None:
        self.mode = mode
        self.challenger_weight = challenger_weight

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
