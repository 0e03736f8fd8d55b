"""Follow a registry alias: load, verify and warm a new version off the request path, then switch atomically.

Requests read ``holder.current`` once and use that object to the end, so requests in flight finish on the
model they started with. A failed load leaves the old model serving and is reported (``last_error``). A version
that fails verification (``tripcast.models.verify``) is refused for good: reported, never loaded into this
process, never tried again; a holder with nothing to serve then falls back to the last champion that passes.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from tripcast.errors import ModelVerificationError
from tripcast.models import TripDurationPipeline
from tripcast.registry import Registry

log = logging.getLogger(__name__)
# The watcher asks the registry again every poll, so MLflow's own retries (7 of them, backing off up to two
# minutes) would only keep a process that cannot see its registry from starting, and from saying so.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
REPEAT_WARNING_SECONDS = 300  # while reloads keep failing, the warning again this often
SIGNAL_SECONDS = 0.25  # how often a worker looks for a reload another worker announced
FALLBACK_CANDIDATES = 5  # earlier champions tried when the alias's version is refused and nothing serves yet
WARM_RIDES = pd.DataFrame({"PULocationID": [130, 74], "DOLocationID": [205, 75], "trip_distance": [3.7, 1.2],
                           "pickup_datetime": ["2021-02-01T08:30:00", "2021-02-06T13:15:00"]})


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    alias: str
    run_id: str
    loaded_at: str
    pipeline: TripDurationPipeline = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)

    @cached_property
    def ref(self) -> dict[str, str]:
        """What answered, as the API reports it with every prediction."""
        return {"name": self.name, "version": self.version, "alias": self.alias}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
                "model": self.pipeline.name, "loaded_at": self.loaded_at, "validation": self.metrics}


class ModelHolder:
    def __init__(self, registry: Registry, alias: str, fall_back: bool = False,
                 needed: Callable[[], bool] | None = None) -> None:
        self.registry = registry
        self.alias = alias
        self.fall_back = fall_back  # serve an earlier champion while the alias's version is refused
        self.needed = needed  # asked before each check: if it says no (no experiment), nothing is loaded
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.last_check: str | None = None
        self._said_waiting = False
        self.reloads = 0
        self.failures = 0
        self.wanted: str | None = None  # the version the alias pointed at, at the last check
        self.refused: dict[str, str] = {}  # version -> why it failed verification (never tried again)
        self.fallback: str | None = None  # why the version served is not the alias's
        self._warned = 0.0  # when the last failure was logged
        self._waiting_for: str | None = None  # a refused version with no earlier champion to serve instead (said)
        self._lock = threading.Lock()  # one refresh at a time (watcher and /admin/reload)
        for key, value in FAIL_FAST.items():
            os.environ.setdefault(key, value)

    def refresh(self) -> bool:
        """Load the version the alias points at, if it changed. True if a new model is now served."""
        with self._lock:
            self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
            serving = self.current.version if self.current else "nothing"
            try:
                version = self.wanted = self.registry.current(self.alias) if self.needed is None or self.needed() \
                    else None
                if version is None and self.needed is not None and self.current is not None:
                    log.info("alias %s: version %s no longer served", self.alias, serving)
                    self.current = None
                    return True
                if version is None and self.current is None and self.fall_back and not self._said_waiting:
                    # The champion's holder says once what it waits for (a new registry has no champion yet).
                    log.warning("no version behind alias %s of %s yet: waiting for one (tripcast train or tripcast "
                                "models promote makes one; this API checks every poll)", self.alias,
                                self.registry.name)
                    self._said_waiting = True
                if version is None or version == serving or version in self.refused:
                    self._ok(serving)
                    if version == serving:
                        self.fallback = None
                    elif version in self.refused and self.current is None and self.fall_back:
                        return self._fall_back(version)
                    return False
                loaded = self._load(version)
            except ModelVerificationError as exc:
                self._refuse(version, exc)
                return self._fall_back(version) if self.current is None and self.fall_back else False
            except Exception as exc:  # any other failure (a check that timed out too): tried again at the next poll
                return self._failed(serving, exc)
            self._serve(loaded)
            self.fallback = None
            return True

    def _serve(self, loaded: LoadedModel) -> None:
        self.current = loaded  # the atomic switch: one reference assignment
        self.reloads += 1
        self._ok(loaded.version)
        log.info("alias %s: now serving version %s", self.alias, loaded.version)

    def _failed(self, serving: str, exc: Exception) -> bool:
        self.failures += 1
        # Said when it starts and every few minutes while it lasts, not at every poll.
        if self.last_error is None or time.monotonic() - self._warned >= REPEAT_WARNING_SECONDS:
            log.warning("alias %s: reload failed, still serving %s: %s", self.alias, serving,
                        f"{type(exc).__name__}: {exc}"[:500])
            self._warned = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        return False

    def _refuse(self, version: str, exc: ModelVerificationError) -> None:
        self.failures += 1
        self.refused[version] = str(exc)[:500]
        serving = f"still serving version {self.current.version}" if self.current else "nothing served yet"
        log.error("alias %s: version %s refused, %s: %s", self.alias, version, serving, exc)
        if self.current is not None and version == self.wanted:
            self.fallback = f"version {version} (behind {self.alias!r}) was refused; {serving}"

    def _fall_back(self, refused: str) -> bool:
        """Serve the newest earlier champion that passes verification; False (waiting) if none does."""
        try:
            candidates = [v for v in reversed(self.registry.history()) if v != refused and v not in self.refused]
            if not candidates and self._waiting_for == refused:
                return False  # said already: waiting for a new version
            for version in candidates[:FALLBACK_CANDIDATES]:
                try:
                    loaded = self._load(version)
                except ModelVerificationError as exc:
                    self._refuse(version, exc)
                    continue
                self._serve(loaded)
                self.fallback = (f"version {refused} (behind {self.alias!r}) was refused; serving version {version}, "
                                 "the last champion before it that passes verification")
                log.warning("alias %s: %s", self.alias, self.fallback)
                return True
        except Exception as exc:
            return self._failed("nothing", exc)
        log.error("alias %s: version %s was refused and no earlier champion passes verification; waiting for a new "
                  "version", self.alias, refused)
        self._waiting_for = refused
        return False

    def _ok(self, serving: str) -> None:
        """A check that worked: an earlier failure (the registry down, a version that would not load) is over."""
        if self.last_error is not None:
            log.warning("alias %s: recovered, serving %s", self.alias, serving)
        self.last_error = None

    def state(self) -> dict:
        """What this holder serves and what went wrong, for /ready and /model."""
        return {"serving": self.current.describe() if self.current else None, "reloads": self.reloads,
                "reload_failures": self.failures, "last_reload_error": self.last_error,
                "last_check": self.last_check, "wanted": self.wanted, "refused": dict(self.refused),
                "fallback": self.fallback}

    def _load(self, version: str) -> LoadedModel:
        mv, pipeline = self.registry.load_pipeline(version)  # verified before it is loaded here
        # The first calls pay lazy initialisation (both paths), not a user's request.
        warm = pipeline.predict_features(pipeline.preprocessor.transform(WARM_RIDES))  # the vectorised path
        first = WARM_RIDES.iloc[0]
        warm_one = pipeline.predict_one(int(first.PULocationID), int(first.DOLocationID), float(first.trip_distance),
                                        datetime.fromisoformat(first.pickup_datetime))
        if not (np.isfinite(warm).all() and warm_one == warm[0]):
            raise ValueError(f"version {version} predicts non-finite durations, or one ride differently alone")
        settings = self.registry.settings
        if settings.compile_models:  # batches ~10x faster once compiled (~3 s, in the background), same figures
            threading.Thread(target=pipeline.compile, args=(settings.home / "cache" / "compiled",),
                             name=f"compile-{version}", daemon=True).start()
        run = self.registry.client.get_run(mv.run_id) if mv.run_id else None
        metrics = {k: round(v, 4) for k, v in (run.data.metrics if run else {}).items()
                   if k in ("val_rmse", "val_mae", "val_r2", "baseline_val_rmse")}
        return LoadedModel(self.registry.name, str(mv.version), self.alias, mv.run_id or "",
                           datetime.now(UTC).isoformat(timespec="seconds"), pipeline, metrics)


class AliasWatcher:
    """Polls the registry every ``interval`` seconds in a daemon thread.

    The worker processes of one server share a ``signal`` file: ``announce`` (from ``/admin/reload``, which
    reaches one worker) writes a new token in it, and every watcher that sees the token change checks the
    registry at once instead of at its next poll.
    """

    def __init__(self, holders: list[ModelHolder], interval: float, signal: Path | None = None) -> None:
        self.holders = holders
        self.interval = interval
        self.signal = signal
        self._seen = self._token()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)

    def _token(self) -> str | None:
        try:
            return self.signal.read_text() if self.signal else None
        except OSError:
            return None

    def announce(self) -> None:
        """Ask the other workers' watchers to check the registry now (this worker has just checked)."""
        if self.signal is None:
            return
        token = secrets.token_hex(8)
        part = self.signal.with_name(f".{self.signal.name}.{token}")
        try:
            part.write_text(token)
            part.replace(self.signal)  # atomic: a watcher never reads half a token
        except OSError as exc:  # the others still follow at their next poll
            log.warning("could not ask the other workers to check the registry: %s", exc)
            return
        self._seen = token

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        due = time.monotonic() + self.interval
        while not self._stop.wait(min(SIGNAL_SECONDS, self.interval) if self.signal else self.interval):
            token = self._token()
            if time.monotonic() >= due or token != self._seen:
                self._seen, due = token, time.monotonic() + self.interval
                for holder in self.holders:
                    holder.refresh()
