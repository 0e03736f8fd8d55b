"""Which model answers a ride: champion only, an A/B split sticky per ride_id, or shadow."""

from __future__ import annotations

import hashlib

CHAMPION_ARM, CHALLENGER_ARM = "champion", "challenger"


def bucket(ride_id: str) -> float:
    """A stable number in [0, 1) per ride_id: the same ride always lands in the same arm."""
    digest = hashlib.blake2b(ride_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


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

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"
