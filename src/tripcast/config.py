"""One settings object: environment variables ``TRIPCAST_*`` over an optional ``tripcast.toml`` over defaults.

Every path the embedded profile writes lives under ``TRIPCAST_HOME`` (default ``./.tripcast``), so a
laptop run needs nothing set up: MLflow uses a SQLite file and a local artifact folder, Prefect gets its
own home. The production profile only changes ``TRIPCAST_TRACKING_URI`` (an MLflow server or a
``postgresql://`` backend store).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tripcast.errors import TripcastError

TLC_BASE_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data"
ENV_PREFIX = "TRIPCAST_"


class ConfigError(TripcastError, ValueError):
    """A setting has a value tripcast cannot use."""


@dataclass(frozen=True)
class Settings:
    home: Path = Path(".tripcast")
    # Where the monthly files come from: the TLC's address, or a mirror (directory, file:// or http(s)://).
    tlc_base_url: str = TLC_BASE_URL
    tlc_mirror: str | None = None
    download_retries: int = 4
    download_backoff_seconds: float = 2.0
    download_timeout_seconds: float = 60.0
    # MLflow. None means the embedded SQLite store under home.
    tracking_uri: str | None = None
    experiment: str = "tripcast"
    model_name: str = "tripcast-duration"
    # Target filter (minutes) and the promotion policy.
    min_duration: float = 1.0
    max_duration: float = 60.0
    max_distance: float | None = None  # miles; None keeps the course's filters (duration only)
    promotion_margin: float = 0.01  # relative RMSE improvement a challenger needs over the champion
    progress: bool = True
    # Serving (see tripcast.serving): alias followed, traffic policy, prediction log.
    serve_alias: str = "champion"
    poll_seconds: float = 10.0
    admin_token: str | None = None
    traffic_mode: str = "champion"  # champion | ab | shadow
    challenger_weight: float = 0.1  # share of rides the challenger serves in "ab" mode
    batch_limit: int = 10_000
    monitoring_uri: str | None = None  # SQLAlchemy URL of the monitoring store; None: SQLite under home
    log_queue_size: int = 100_000
    # Rows per transaction of the log writer. Each row's ride_id lands on a random page of its index, and a
    # transaction writes every page it touched once: on a 2M-row SQLite store, 20,000-row transactions cost
    # 5.6 us of CPU per row where 1,000-row ones cost 11.6 (bench/predlog.py).
    log_batch_size: int = 20_000
    log_flush_seconds: float = 0.5
    # The spool (the store down, or behind) stops taking rows at this size, so it cannot fill the disk; rows
    # are then dropped and counted. ~8,000 rows a MB: 2 GB hold an hour of a 4,500 predictions/s outage.
    log_spool_max_mb: float = 2048
    # Monitoring (see tripcast.monitoring): windows of logged predictions and their thresholds. The defaults
    # were measured on green 2021-2023: weekly 2021 windows stay below them, 2023 windows do not.
    window: str = "week"  # day | week (a day of green taxi rides is too few for stable zone statistics)
    min_window_rows: int = 500  # fewer rides than this in a window: no drift verdict
    drift_threshold: float = 0.1  # per column: Jensen-Shannon (zones) / normed Wasserstein (numbers)
    drift_share: float = 0.5  # share of drifted features that makes the dataset drifted
    od_drift_threshold: float = 0.12  # Jensen-Shannon distance of the zone-pair mix
    rmse_increase: float = 0.2  # accuracy alert at RMSE >= (1 + this) x the version's validation RMSE
    alert_windows: int = 1  # consecutive breached windows before a rule fires
    alert_webhook_url: str | None = None
    alert_webhook_attempts: int = 3
    # The automation policy: alert -> retrain on recent labelled rides -> promote or reject.
    automate: bool = True
    retrain_model: str = "lightgbm"
    retrain_lookback_days: float = 28.0  # labelled rides this far before the evaluation window train it
    retrain_min_rows: int = 5_000  # fewer labelled rides: no retrain (deferred)
    promotion_min_rows: int = 1_000  # fewer labelled rides in the evaluation window: no promotion
    retrain_cooldown_days: float = 7.0  # event time between two retrains
    retrain_max: int = 3  # at most this many retrains ...
    retrain_period_days: float = 30.0  # ... per this period (event time)
    extra: dict[str, Any] = field(default_factory=dict)

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
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: Any, annotation: str) -> Any:
    try:
        if annotation in ("Path",):
            return Path(raw).expanduser()
        if annotation.startswith("int"):
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        if annotation.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if annotation.startswith("str"):
            return str(raw) if raw not in ("", None) else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={raw!r} is not a valid {annotation}") from exc
    return raw


def load_settings(config_file: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read ``tripcast.toml`` (if present) and then ``TRIPCAST_*`` variables, which win."""
    env = dict(os.environ) if env is None else env
    config_file = config_file or Path(env.get(f"{ENV_PREFIX}CONFIG", "tripcast.toml"))
    values: dict[str, Any] = {}
    known = {f.name: str(f.type) for f in fields(Settings) if f.name != "extra"}
    if config_file.is_file():
        try:
            table = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from exc
        table = table.get("tripcast", table)
        for key, raw in table.items():
            if key not in known:
                raise ConfigError(f"{config_file}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
            values[key] = _coerce(key, raw, known[key])
    for key, annotation in known.items():
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key] = _coerce(ENV_PREFIX + key.upper(), raw, annotation)
    settings = Settings(**values)
    if settings.min_duration >= settings.max_duration:
        raise ConfigError("min_duration must be below max_duration")
    if settings.traffic_mode not in ("champion", "ab", "shadow"):
        raise ConfigError(f"traffic_mode {settings.traffic_mode!r}: choose champion, ab or shadow")
    if settings.window not in ("day", "week"):
        raise ConfigError(f"window {settings.window!r}: choose day or week")
    if not 0.0 <= settings.challenger_weight <= 1.0:
        raise ConfigError("challenger_weight must be between 0 and 1")
    return settings
