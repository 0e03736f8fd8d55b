"""One settings object: environment variables ``TRIPCAST_*`` over an optional ``tripcast.toml`` over defaults.

Every path the embedded profile writes lives under ``TRIPCAST_HOME`` (default ``./.tripcast``), so a
laptop run needs nothing set up: MLflow uses a SQLite file and a local artifact folder, Prefect gets its
own home. The production profile only changes ``TRIPCAST_TRACKING_URI`` (an MLflow server or a
``postgresql://`` backend store).

Settings are parsed here, once: every number has its range and every choice its values (pydantic checks
them), and a value outside them is one line naming the setting and what it may be.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from tripcast.errors import TripcastError

TLC_BASE_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data"
ENV_PREFIX = "TRIPCAST_"

Seconds = Annotated[float, Field(gt=0)]
Days = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1)]


class ConfigError(TripcastError, ValueError):
    """A setting has a value tripcast cannot use."""


_SCHEDULER = re.compile(r"(tcp|tls|ws|wss)://[^\s/]+")


@dataclasses.dataclass(frozen=True)
class DaskTarget:
    """Where work on a Dask cluster runs: an existing scheduler (``address``), or a LocalCluster of ``workers``
    processes that tripcast starts and stops (``address`` None)."""

    address: str | None = None
    workers: int = 2

    @classmethod
    def parse(cls, value: object) -> DaskTarget | None:
        """'' (in-process: no Dask), 'local' (a worker per core), 'local:N' or a scheduler address."""
        if value is None or isinstance(value, DaskTarget):
            return value
        text = str(value).strip()
        if text == "":
            return None
        if text == "local":
            return cls(None, os.cpu_count() or 1)
        if (match := re.fullmatch(r"local:(\d+)", text)) and 1 <= int(match.group(1)) <= 256:
            return cls(None, int(match.group(1)))
        if _SCHEDULER.fullmatch(text):
            return cls(text)
        raise ValueError("local, local:N (1 to 256 workers) or a scheduler address such as tcp://host:8786")

    def __str__(self) -> str:
        return self.address or f"local:{self.workers}"


@dataclass(frozen=True, config=ConfigDict(allow_inf_nan=False, extra="forbid"))
class Settings:
    home: Path = Path(".tripcast")
    # Where the monthly files come from: the TLC's address, or a mirror (directory, file:// or http(s)://).
    tlc_base_url: Name = TLC_BASE_URL
    tlc_mirror: str | None = None
    download_retries: Annotated[int, Field(ge=1, le=20)] = 4
    download_backoff_seconds: Annotated[float, Field(ge=0, le=300)] = 2.0
    download_timeout_seconds: Seconds = 60.0
    # MLflow. None means the embedded SQLite store under home.
    tracking_uri: str | None = None
    mlflow_experiment: Name = "tripcast"  # the MLflow experiment runs are logged to
    model_name: Name = "tripcast-duration"
    # How long a command waits for the registry (an MLflow server or database) to answer before it gives up.
    registry_wait_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0
    # A model version is loaded and checked in a separate process before it is served; this bounds that check.
    verify_timeout_seconds: Annotated[float, Field(ge=5, le=3600)] = 120.0
    # Target filter (minutes) and the promotion policy.
    min_duration: Annotated[float, Field(ge=0)] = 1.0
    max_duration: Annotated[float, Field(gt=0, le=24 * 60)] = 60.0
    max_distance: Annotated[float, Field(gt=0)] | None = None  # miles; None keeps the course's filters
    promotion_margin: Annotated[float, Field(ge=0, lt=1)] = 0.01  # relative RMSE gain needed over the champion
    progress: bool = True
    # The engine for commands that read months (train, evaluate, score, monitor, loop): None in-process, else a
    # Dask cluster (tripcast.cluster). Local clusters get this much memory per worker (None: Dask's share).
    dask: Annotated[DaskTarget | None, BeforeValidator(DaskTarget.parse)] = None
    dask_worker_memory_gb: Annotated[float, Field(gt=0)] | None = None
    dask_connect_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    # Serving (see tripcast.serving): alias followed, traffic policy, prediction log.
    serve_alias: Name = "champion"
    poll_seconds: Annotated[float, Field(ge=0.05, le=86_400)] = 10.0
    admin_token: str | None = None
    viewer_token: str | None = None  # wanted by /dashboard and /metrics when set (read-only; the admin token too)
    traffic_mode: Literal["champion", "ab", "shadow"] = "champion"
    challenger_weight: Share = 0.1  # share of rides the challenger serves in "ab" mode
    batch_limit: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    compile_models: bool = True  # serving: LightGBM trees compiled to native code for batches (lleaves)
    monitoring_uri: str | None = None  # SQLAlchemy URL of the monitoring store; None: SQLite under home
    log_queue_size: Count = 100_000
    # Rows per transaction of the log writer. Each row's ride_id lands on a random page of its index, and a
    # transaction writes every page it touched once: on a 2M-row SQLite store, 20,000-row transactions cost
    # 5.6 us of CPU per row where 1,000-row ones cost 11.6 (bench/predlog.py).
    log_batch_size: Count = 20_000
    log_flush_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5
    # The journal (answered predictions not yet in the store) stops taking rows at this size, so it cannot fill
    # the disk; rows are then dropped and counted. ~8,000 rows a MB: 2 GB hold an hour of a 4,500/s outage.
    log_spool_max_mb: Annotated[float, Field(gt=0)] = 2048
    # When the journal reaches the disk itself: "off" leaves it to the OS (a killed process loses nothing, a
    # power cut may), "interval" every flush, "always" before each answer (requests share one fsync).
    log_fsync: Literal["off", "interval", "always"] = "interval"
    # HTTP limits of `tripcast serve`: a request's headers, and how long its headers and its body may take.
    http_max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 16_384
    http_header_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    http_body_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Monitoring (see tripcast.monitoring): windows of logged predictions and their thresholds. The defaults
    # were measured on green 2021-2023: weekly 2021 windows stay below them, 2023 windows do not.
    window: Literal["day", "week"] = "week"  # a day of green taxi rides is too few for stable zone statistics
    min_window_rows: Count = 500  # fewer rides than this in a window: no drift verdict
    # Larger windows are read from the store in slices: counts exact, Evidently's drift on a uniform sample this big.
    drift_sample_rows: Annotated[int, Field(ge=1000)] = 200_000
    reports_keep: Annotated[int, Field(ge=0)] = 500  # Evidently HTML reports kept, newest windows; 0: none
    # Logged predictions older than this (by pickup) move from the store to parquet under home/archive (the
    # retention flow); None keeps them all in the store.
    retention_days: Annotated[float, Field(gt=0)] | None = None
    drift_threshold: Annotated[float, Field(gt=0)] = 0.1  # per column: Jensen-Shannon / normed Wasserstein
    drift_share: Annotated[float, Field(gt=0, le=1)] = 0.5  # share of drifted features: the dataset drifted
    od_drift_threshold: Annotated[float, Field(gt=0, le=1)] = 0.12  # Jensen-Shannon distance of the pair mix
    # A distance is also held to what sampling noise alone reaches at the window's and the reference's sizes
    # (tripcast.monitoring.stats): the chance that noise alone passes that second threshold.
    drift_false_alarm: Annotated[float, Field(gt=0, lt=0.5)] = 0.01
    rmse_increase: Annotated[float, Field(gt=0)] = 0.2  # accuracy alert at RMSE >= (1 + this) x validation RMSE
    alert_windows: Annotated[int, Field(ge=1, le=100)] = 1  # consecutive breached windows before a rule fires
    alert_webhook_url: str | None = None
    alert_webhook_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    # The automation policy: alert -> retrain on recent labelled rides -> promote or reject.
    automate: bool = True
    retrain_model: Name = "lightgbm"
    retrain_lookback_days: Annotated[float, Field(gt=0)] = 28.0  # labelled rides this far before evaluation
    retrain_min_rows: Count = 5_000  # fewer labelled rides: no retrain (deferred)
    promotion_min_rows: Count = 1_000  # fewer labelled rides in the evaluation window: no promotion
    retrain_cooldown_days: Days = 7.0  # event time between two retrains
    retrain_max: Count = 3  # at most this many retrains ...
    retrain_period_days: Annotated[float, Field(gt=0)] = 30.0  # ... per this period (event time)
    # Online experiments (see tripcast.monitoring.experiments): what automation does with a challenger that
    # passes the offline gate (off: promote it at once), and the sequential test that decides.
    experiment: Literal["shadow", "ab", "off"] = "shadow"
    experiment_weight: Annotated[float, Field(gt=0, lt=1)] = 0.1  # ab: the challenger's share of rides
    experiment_alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05  # 1 - confidence of every decision
    experiment_min_rides: Annotated[int, Field(ge=100)] = 1_000  # labelled rides before any decision
    experiment_planned_rides: Annotated[int, Field(ge=100)] = 20_000  # where the test's interval is tightest
    experiment_max_rides: Count = 1_000_000  # futility: rejected if the margin is not shown by then ...
    experiment_max_days: Annotated[float, Field(gt=0)] = 28.0  # ... or by this much event time
    guard_days: Days = 7.0  # after a promotion the old champion is shadowed this long (0: no guard)

    @field_validator("retrain_model")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from tripcast.models import FAMILIES  # on use: serving a model need not import every family

        if value not in FAMILIES:
            raise ValueError(f"one of {', '.join(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _durations_ordered(self) -> Settings:
        if self.min_duration >= self.max_duration:
            raise ValueError(f"min_duration ({self.min_duration:g}) must be below max_duration "
                             f"({self.max_duration:g})")
        return self

    @model_validator(mode="after")
    def _retention_covers_retraining(self) -> Settings:
        # A retrain reads the labelled rides of its lookback, and monitoring the window before: both from the store.
        if self.retention_days is not None and self.retention_days < self.retrain_lookback_days + 7:
            raise ValueError(f"retention_days ({self.retention_days:g}) must be at least retrain_lookback_days "
                             f"+ 7 ({self.retrain_lookback_days + 7:g}): retraining reads that far back")
        return self

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.mlflow_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str | None:
        """Local artifact folder for the embedded profile; a tracking server picks its own."""
        uri = self.resolved_tracking_uri
        if uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.mlflow_dir / "artifacts").resolve().as_uri()

    @property
    def resolved_monitoring_uri(self) -> str:
        return self.monitoring_uri or f"sqlite:///{(self.home / 'monitoring.db').resolve()}"

    @property
    def archive_dir(self) -> Path:
        return self.home / "archive"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def allowed(name: str) -> str:
    """What a setting may be, in words: its choices, or its type and range."""
    info = Settings.__pydantic_fields__[name]
    annotation, metadata = info.annotation, list(info.metadata)
    inner = [a for a in get_args(annotation) if a is not type(None)]
    if len(inner) == 1:  # optional: the value's own type and constraints
        annotation = inner[0]
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += [m for f in extra for m in getattr(f, "metadata", [f])]
    choices = get_args(annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return "one of " + ", ".join(choices)
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "a non-empty text",
            Path: "a path"}.get(annotation, "a value")
    bounds = [f"{word} {_number(getattr(m, attr))}" for m in metadata for cls, (word, attr) in _BOUNDS.items()
              if isinstance(m, cls)]
    return kind + (" " + " and ".join(bounds) if bounds else "") + (" (or empty: unset)" if inner else "")


def _number(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() and abs(value) >= 10_000 else f"{value:g}"


_BOUNDS = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("≤", "le"),
           annotated_types.Lt: ("<", "lt")}


def _settings(values: dict[str, Any], labels: dict[str, str]) -> Settings:
    """``Settings(**values)``; a value it refuses is one line naming where it came from and what is allowed."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        if name not in labels:  # a rule across settings: named as the user set them
            message = error["msg"].removeprefix("Value error, ")
            for key, label in labels.items():
                message = message.replace(key, label)
            raise ConfigError(f"settings: {message}") from None
        detail = allowed(name) if error["type"] not in ("value_error",) else error["msg"].removeprefix(
            "Value error, ")
        raise ConfigError(f"{labels[name]}={values[name]!r} is not allowed: it must be {detail}") from None


def load_settings(config_file: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read ``tripcast.toml`` (if present) and then ``TRIPCAST_*`` variables, which win."""
    env = dict(os.environ) if env is None else env
    config_file = config_file or Path(env.get(f"{ENV_PREFIX}CONFIG", "tripcast.toml"))
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    if config_file.is_file():
        try:
            table = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from exc
        for key, raw in table.get("tripcast", table).items():
            if key not in known:
                raise ConfigError(f"{config_file}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
            values[key], labels[key] = raw, f"{config_file}: {key}"
    for key in known:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            # An empty variable unsets an optional setting (TRIPCAST_TRACKING_URI= means the embedded store).
            values[key] = None if raw == "" and _optional(key) else raw
            labels[key] = ENV_PREFIX + key.upper()
    return _settings(values, labels)


def _optional(name: str) -> bool:
    return Settings.__dataclass_fields__[name].default is None
