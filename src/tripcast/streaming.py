"""Streaming predictions from a Redis Stream: the open-source counterpart of the course's Kinesis + Lambda.

Each event's field ``ride`` holds the ride as JSON (the API's request shape). The consumer reads through a
consumer group, publishes ``{ride_id, duration, model_version, event_id}`` to the output stream, and only then
acknowledges the event (at-least-once). A malformed event goes to the dead-letter stream with its error and is
acknowledged. Events a crashed consumer left pending are claimed after ``claim_idle_ms``. Each process is a
new consumer (host-pid), so the group's list of consumers would only grow: a consumer that stops cleanly
leaves the group, and one idle for ``forget_idle_ms`` (a crashed one) is removed, each only with nothing
pending. Connection errors (a Redis restart) are waited out with back-off, and a group that Redis lost is
made again; nothing is acknowledged that was not published.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from tripcast.errors import TripcastError
from tripcast.registry import Registry
from tripcast.serving.holder import AliasWatcher, ModelHolder
from tripcast.serving.predlog import PredictionLog
from tripcast.serving.schemas import RIDE, RideColumns
from tripcast.serving.scoring import Scorer
from tripcast.serving.traffic import CHAMPION_ONLY

log = logging.getLogger(__name__)
MAX_BACKOFF = 10.0  # seconds between tries to reach Redis, at most
MAX_LEN = 1_000_000  # entries kept (about) in the output and dead-letter streams
FORGET_IDLE_MS = 24 * 3600 * 1000  # a consumer idle this long with nothing pending is removed from the group
# Removes a consumer only if it has nothing pending, in one step: between a look at XINFO and the removal it
# may have read events, and XGROUP DELCONSUMER drops a consumer's pending events with it, unacknowledged.
FORGET_IF_NOTHING_PENDING = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclass(frozen=True)
class StreamNames:
    input: str = "tripcast:rides"
    output: str = "tripcast:predictions"
    dead_letter: str = "tripcast:dead-letter"
    group: str = "tripcast"


class StreamConsumer:
    def __init__(self, client: redis.Redis, holder: ModelHolder, names: StreamNames = StreamNames(),
                 consumer: str | None = None, batch: int = 500, block_ms: int = 1000, claim_idle_ms: int = 30_000,
                 predlog: PredictionLog | None = None, max_len: int = MAX_LEN,
                 forget_idle_ms: int = FORGET_IDLE_MS) -> None:
        # Events are read as bytes: a client that decodes them would fail on an event that is not UTF-8, every
        # time it is delivered (a poison event); as bytes it is validated, and dead-lettered, like any other.
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("StreamConsumer needs a Redis client with decode_responses=False")
        self.redis = client
        self.holder = holder
        self.names = names
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch, self.block_ms, self.claim_idle_ms = batch, block_ms, claim_idle_ms
        self.forget_idle_ms = forget_idle_ms
        # The streams we write are capped (approximately: Redis trims whole nodes, cheaply), or they would grow
        # until Redis runs out of memory; readers of the predictions have the last ``max_len`` of them.
        self.max_len = max_len
        self.predlog = predlog
        self.scorer = Scorer(holder, None, lambda: CHAMPION_ONLY, "stream")  # experiments run on the API's traffic
        self.published = self.dead = self.reconnects = self.regrouped = self.forgotten = 0
        self._forget = client.register_script(FORGET_IF_NOTHING_PENDING)
        self._next_forget = 0.0  # monotonic time of the next look for idle consumers

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.names.input, self.names.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event) -> None:
        backoff, down_since = 0.5, None
        while not stop.is_set():
            try:
                self.ensure_group()
                if down_since is not None:
                    log.warning("redis answers again after %.0f s", time.monotonic() - down_since)
                    backoff, down_since = 0.5, None
                while not stop.is_set():
                    self.step()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.reconnects += 1
                if down_since is None:  # said once per outage, not at every retry
                    down_since = time.monotonic()
                    log.warning("redis unavailable (%s); retrying, every %.0f s at most", exc, MAX_BACKOFF)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except redis.ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                # Redis lost its data (restarted without persistence, or the stream was deleted, which also
                # ends a blocked read with UNBLOCKED): the loop makes the group again, from the first event.
                self.regrouped += 1
                log.warning("consumer group %s on %s is gone (%s); creating it again", self.names.group,
                            self.names.input, exc)
        # Stopped cleanly: the next process is a consumer of another name. If Redis is down now, a later
        # consumer removes this one once it has been idle long enough.
        with contextlib.suppress(redis.RedisError):
            self.leave()

    def step(self) -> int:
        """Claim stale pending events, read new ones, process them. Returns how many were handled."""
        _, claimed, _ = self.redis.xautoclaim(self.names.input, self.names.group, self.consumer,
                                              min_idle_time=self.claim_idle_ms, start_id="0-0", count=self.batch)
        entries = list(claimed)
        if time.monotonic() >= self._next_forget:
            self.forget_idle()
        if not entries:
            read = self.redis.xreadgroup(self.names.group, self.consumer, {self.names.input: ">"},
                                         count=self.batch, block=self.block_ms)
            entries = read[0][1] if read else []
        if entries:
            self.process(entries)
        return len(entries)

    def forget_idle(self) -> list[str]:
        """Remove the group's consumers idle for ``forget_idle_ms`` with nothing pending (a crashed consumer's
        events are claimed first); returns their names. Looked at once a minute at most.

        Redis 7.0 counts a consumer idle until it is given an event, so a live consumer of a quiet stream may
        be removed too: harmless, with nothing pending, and Redis adds it again when it reads its next event."""
        self._next_forget = time.monotonic() + min(60_000, self.forget_idle_ms) / 1000
        gone = []
        for info in self.redis.xinfo_consumers(self.names.input, self.names.group):
            name = info["name"]  # bytes, as the client reads everything: another program's names may not be UTF-8
            if name != self.consumer.encode() and not info["pending"] and info["idle"] >= self.forget_idle_ms \
                    and self._forget(keys=[self.names.input], args=[self.names.group, name]) >= 0:
                gone.append(name.decode(errors="replace"))
        if gone:
            self.forgotten += len(gone)
            log.info("removed consumer(s) idle for %.0f s with nothing pending from group %s: %s",
                     self.forget_idle_ms / 1000, self.names.group, ", ".join(gone))
        return gone

    def leave(self) -> bool:
        """Take this consumer out of the group, unless it still has events pending (another consumer claims
        those); True if it left."""
        return self._forget(keys=[self.names.input], args=[self.names.group, self.consumer]) >= 0

    def process(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if self.holder.current is None:
            raise RuntimeError(f"no model behind alias {self.holder.alias!r}")  # leave events pending
        rides, ids, dead = [], [], []
        for event_id, fields in entries:
            try:
                rides.append(RIDE.validate_json(fields.get(b"ride", b"")))
                ids.append(event_id)
            except ValidationError as exc:
                errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'ride'}: {e['msg']}" for e in exc.errors())
                dead.append((event_id, fields, errors))
        pipe = self.redis.pipeline(transaction=True)
        for event_id, fields, error in dead:
            pipe.xadd(self.names.dead_letter, {"event_id": event_id, "ride": fields.get(b"ride", b""), "error": error},
                      maxlen=self.max_len, approximate=True)
        if rides:
            scored = self.scorer.many(RideColumns.from_rides(rides))
            if self.predlog is not None:
                # Journaled before the predictions are published: killed after publishing, the process would
                # lose these rows. Killed before, the events stay pending and are predicted (and logged) again.
                self.predlog.wait_durable(self.predlog.put(scored.log_rows))
            for event_id, ride_id, duration, version in zip(ids, scored.ride_ids, scored.durations.tolist(),
                                                            scored.versions, strict=True):
                pipe.xadd(self.names.output, {"event_id": event_id, "ride_id": ride_id, "duration": repr(duration),
                                              "model_version": version}, maxlen=self.max_len, approximate=True)
        # Publish and acknowledge in one MULTI/EXEC: an event is acknowledged only with its output.
        pipe.xack(self.names.input, self.names.group, *[e for e, _ in entries])
        pipe.execute()
        self.published += len(rides)
        self.dead += len(dead)


def run_consumer(settings, redis_url: str, names: StreamNames, stop: threading.Event | None = None,
                 max_len: int = MAX_LEN) -> None:
    """The ``tripcast stream`` process: model from the registry alias, predictions logged like the API's."""
    stop = stop or threading.Event()
    try:
        client = redis.Redis.from_url(redis_url)  # bytes, not decoded: see StreamConsumer
    except ValueError as exc:
        raise TripcastError(f"Redis URL {redis_url!r}: {exc}") from None
    holder = ModelHolder(Registry(settings), settings.serve_alias, fall_back=True)
    # Like the API, wait for a model rather than exit: in the production profile this service starts before
    # the first training run, or before the registry answers.
    holder.refresh()
    if holder.current is None:
        # A failure to reach the registry has just been logged by the holder; not twice.
        log.warning("no %r version to serve yet%s; asking the registry every %g s", settings.serve_alias,
                    "" if holder.last_error else " (none registered)", settings.poll_seconds)
    while holder.current is None:
        if stop.wait(settings.poll_seconds):
            return
        holder.refresh()
    watcher = AliasWatcher([holder], settings.poll_seconds)
    predlog = PredictionLog.from_settings(settings)
    watcher.start()
    predlog.start()
    consumer = StreamConsumer(client, holder, names, predlog=predlog, max_len=max_len)
    served = holder.current
    log.info("consuming %s as %s/%s with %s version %s (%s)", names.input, names.group, consumer.consumer,
             served.name, served.version, served.alias)
    try:
        consumer.run(stop)
    finally:
        watcher.stop()
        predlog.stop()
    log.info("stopped: %d predictions published, %d events dead-lettered, %d rows logged", consumer.published,
             consumer.dead, predlog.written)
