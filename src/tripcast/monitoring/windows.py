"""Windows of logged predictions measured against the reference of the model that served them.

Windows are cut on event time (the ride's pickup), so a replay of 2021 lands in 2021 windows and a late
prediction still counts in the window of its ride. Per window and model version: data drift per feature
and prediction drift (Evidently), the share of drifted features, an origin-destination drift measure,
data quality, and, once labels have arrived, the realised RMSE and MAE against the validation RMSE.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from sqlalchemy import Select, String, and_, func, select, type_coerce
from sqlalchemy.engine import Engine

from tripcast.config import ConfigError, Settings
from tripcast.features import TARGET, zone_pair
from tripcast.metrics import regression_metrics
from tripcast.monitoring import reports, stats
from tripcast.registry import Registry
from tripcast.store import labels, predictions, upsert, window_metrics

log = logging.getLogger(__name__)
LENGTHS = {"day": timedelta(days=1), "week": timedelta(days=7)}
CATEGORICAL = ["PULocationID", "DOLocationID"]
NUMERICAL = ["trip_distance", "pickup_hour"]
FEATURES = CATEGORICAL + NUMERICAL
UNKNOWN_ZONES = (264, 265)  # the TLC's "Unknown" / "Outside of NYC" zones
OD_TOP_PAIRS = 100  # the reference's most frequent zone pairs; the rest share one bucket (sparse otherwise)
MIN_LABELLED_ROWS = 100  # fewer labelled rides in a window: no realised accuracy


@dataclass(frozen=True)
class Window:
    kind: str
    start: datetime
    end: datetime

    def __str__(self) -> str:
        return f"{self.kind} {self.start:%Y-%m-%d}"


def window_of(kind: str, moment: datetime) -> Window:
    """The window holding ``moment``: days from midnight, weeks from Monday midnight (ISO weeks)."""
    if kind not in LENGTHS:
        raise ConfigError(f"window {kind!r}: choose {' or '.join(LENGTHS)}")
    start = datetime(moment.year, moment.month, moment.day)
    if kind == "week":
        start -= timedelta(days=start.weekday())
    return Window(kind, start, start + LENGTHS[kind])


def window_ending(kind: str, moment: datetime) -> Window:
    """The window an event at ``moment`` belongs to: monitoring acts after a window, at its end, so an event at
    a window's end is that window's (alerts, decisions, looks and the loop's lines all name it so)."""
    return window_of(kind, moment - timedelta(microseconds=1))


def windows_between(kind: str, since: datetime, until: datetime) -> list[Window]:
    """The windows that overlap [since, until)."""
    found, window = [], window_of(kind, since)
    while window.start < until:
        found.append(window)
        window = Window(kind, window.end, window.end + LENGTHS[kind])
    return found


@dataclass
class Reference:
    """A model version's validation rows with its predictions and actual durations (logged at training)."""

    version: str
    frame: pd.DataFrame
    val_rmse: float
    val_mae: float

    @cached_property
    def fingerprint(self) -> tuple:
        """Tells references apart (versions of different registries can share a number)."""
        return self.version, len(self.frame), float(self.frame["prediction"].sum())

    @cached_property
    def pairs(self) -> np.ndarray:
        return zone_pair(self.frame["PULocationID"].to_numpy(np.int64), self.frame["DOLocationID"].to_numpy(np.int64))


# The values a distance's null distribution is drawn over: zones as categories, numbers on a grid.
NULL_SUPPORT = {"drift_PULocationID": ("PULocationID", None), "drift_DOLocationID": ("DOLocationID", None),
                "drift_trip_distance": ("trip_distance", 0.01), "drift_pickup_hour": ("pickup_hour", None),
                "prediction_drift": ("prediction", 0.01)}
_limits: dict[tuple, dict[str, float]] = {}  # by reference, window size and false alarm rate


def drift_thresholds(reference: Reference, n: int, settings: Settings) -> dict[str, float]:
    """Per drift metric, what a window of ``n`` rides must exceed to count as drifted: the fixed threshold, or
    the (1 - TRIPCAST_DRIFT_FALSE_ALARM) quantile of the distance between two samples of the reference, of this
    window's size and of the reference's, whichever is higher. Sizes are rounded down to two significant
    figures (a slightly higher threshold), so a monitoring run computes a handful."""
    n, m = int(float(f"{n:.2g}")), len(reference.frame)
    key = (reference.fingerprint, n, settings.drift_false_alarm)
    if key not in _limits:
        limits = {}
        for metric, (column, resolution) in NULL_SUPPORT.items():
            values, counts = stats.support(reference.frame[column].to_numpy(np.float64), resolution)
            if column in CATEGORICAL:
                statistic = stats.js_distance
            else:
                statistic = lambda p, q, v=values: stats.normed_wasserstein(p, q, v)  # noqa: E731
            noise = stats.null_quantile(counts.astype(np.float64), n, m, statistic, settings.drift_false_alarm)
            limits[metric] = max(settings.drift_threshold, noise)
        top, rest = _od_support(reference.pairs)
        noise = stats.null_quantile(np.append(top, rest), n, m, lambda p, q: stats.js_distance(p, q, base=2),
                                    settings.drift_false_alarm)
        limits["od_drift"] = max(settings.od_drift_threshold, noise)
        _limits[key] = limits
    return _limits[key]


def _od_support(reference_pairs: np.ndarray, top: int = OD_TOP_PAIRS) -> tuple[np.ndarray, float]:
    """Counts of the reference's ``top`` pairs, and of all the others together (the buckets od_drift uses)."""
    counts = pd.Series(reference_pairs).value_counts()
    return counts.iloc[:top].to_numpy(np.float64), float(len(reference_pairs) - counts.iloc[:top].sum())


def load_reference(registry: Registry, version: str, settings: Settings) -> Reference:
    """From the version's MLflow run (cached on disk, checked against its digest): monitoring never needs the
    training files."""
    frame = pd.read_parquet(registry.reference_path(registry.version(version)))
    # Validation accuracy on the rides the model is meant for (the training filter's duration range).
    duration = frame[TARGET]
    meant = frame[(duration >= settings.min_duration) & (duration <= settings.max_duration)]
    accuracy = regression_metrics(meant[TARGET].to_numpy(), meant["prediction"].to_numpy())
    return Reference(version, frame, accuracy["rmse"], accuracy["mae"])


def logged_rides(engine: Engine, start: datetime, end: datetime, labelled_only: bool = False,
                 ride_ids: bool = True) -> pd.DataFrame:
    """Predictions with pickup in [start, end), joined to their labels; ``actual`` is NaN until one arrives."""
    p, lab = predictions.c, labels.c
    # Times come back as text and are parsed by pandas in one go: SQLAlchemy's per-row datetime parsing
    # was most of the cost of a 1M-row window on SQLite.
    as_text = [type_coerce(p.pickup_datetime, String).label("pickup_datetime"),
               type_coerce(lab.dropoff_datetime, String).label("dropoff_datetime")]
    columns = [*[p.ride_id] * ride_ids, p.PULocationID, p.DOLocationID, p.trip_distance, p.prediction,
               p.model_version, p.arm, p.shadow_prediction]
    in_time = and_(p.pickup_datetime >= start, p.pickup_datetime < end)
    if engine.dialect.name == "postgresql" and not labelled_only:
        # Each ride's label by its key: PostgreSQL joined a slice of a window by hashing the whole labels table,
        # once per slice (10M labels, 40 slices: most of three minutes).
        label = lambda column: select(column).where(lab.ride_id == p.ride_id).scalar_subquery()  # noqa: E731
        query = select(*columns, label(lab.actual_duration).label("actual_duration"),
                       type_coerce(label(lab.dropoff_datetime), String).label("dropoff_datetime"),
                       as_text[0]).where(in_time)
    else:
        query = (select(*columns, lab.actual_duration, *as_text)
                 .select_from(predictions.join(labels, p.ride_id == lab.ride_id, isouter=not labelled_only))
                 .where(in_time))
    frame = _copy_out(engine, query) if engine.dialect.name == "postgresql" else _read_sql(engine, query)
    for column in ("pickup_datetime", "dropoff_datetime"):
        frame[column] = pd.to_datetime(frame[column], format="ISO8601")
    from_dropoff = (frame["dropoff_datetime"] - frame["pickup_datetime"]).dt.total_seconds() / 60.0
    frame["actual"] = frame["actual_duration"].astype(float).fillna(from_dropoff)
    return frame.drop(columns=["actual_duration", "dropoff_datetime"])


def _read_sql(engine: Engine, query: Select) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(query, conn)


_TEXT = {"ride_id", "model_version", "arm"}


def _copy_out(engine: Engine, query: Select) -> pd.DataFrame:
    """PostgreSQL's COPY of the query as CSV, parsed by Arrow: a window of millions of rides fetched row by row
    through the driver cost more than PostgreSQL spent finding them."""
    import pyarrow as pa
    from pyarrow import csv

    sql = query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    buffer = io.BytesIO()
    with engine.connect() as conn, conn.connection.driver_connection.cursor().copy(
            f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER true)") as copy:
        for block in copy:
            buffer.write(block)
    buffer.seek(0)
    names = [column.name for column in query.selected_columns]
    types = {name: pa.string() if name in _TEXT else pa.timestamp("us") if name.endswith("_datetime")
             else pa.float64() for name in names}
    table = csv.read_csv(buffer, convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=False))
    return table.to_pandas()


def labelled_training_rides(engine: Engine, start: datetime, end: datetime) -> pd.DataFrame:
    """Labelled rides in [start, end) in the canonical shape training takes (one row per ride)."""
    frame = logged_rides(engine, start, end, labelled_only=True).dropna(subset=["actual"])
    frame = frame.drop_duplicates("ride_id", keep="last")
    return pd.DataFrame({"PULocationID": frame["PULocationID"].astype("int32"),
                         "DOLocationID": frame["DOLocationID"].astype("int32"),
                         "trip_distance": frame["trip_distance"].astype(float),
                         "pickup_datetime": frame["pickup_datetime"].astype("datetime64[us]"),
                         TARGET: frame["actual"].astype(float)}).reset_index(drop=True)


def od_drift(reference_pairs: np.ndarray, current_pairs: np.ndarray, top: int = OD_TOP_PAIRS) -> float:
    """Jensen-Shannon distance (base 2, 0..1) between the zone-pair mixes: the reference's ``top`` pairs and
    one bucket for all others, so that thousands of rare pairs do not turn sampling noise into drift."""
    return od_drift_of_counts(reference_pairs, pd.Series(current_pairs).value_counts(), top)


def od_drift_of_counts(reference_pairs: np.ndarray, current: pd.Series, top: int = OD_TOP_PAIRS) -> float:
    """``od_drift`` from the current rides' counts per zone pair."""
    counts = pd.Series(reference_pairs).value_counts()
    keep = counts.index[:top]
    ref = np.append(counts.iloc[:top].to_numpy(float), len(reference_pairs) - counts.iloc[:top].sum())
    cur = current.reindex(keep, fill_value=0).to_numpy(float)
    cur = np.append(cur, current.sum() - cur.sum())
    return float(jensenshannon(ref, cur, base=2))


def _features(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"PULocationID": frame["PULocationID"].astype("int64"),
                         "DOLocationID": frame["DOLocationID"].astype("int64"),
                         "trip_distance": frame["trip_distance"].astype(float),
                         "pickup_hour": frame["pickup_hour"].astype("int64"),
                         "prediction": frame["prediction"].astype(float)})


def drift_report(current: pd.DataFrame, reference: pd.DataFrame, settings: Settings, html: Path | None):
    """Evidently: drift per feature and of the prediction, as distances; optional HTML report (whose verdicts use
    the fixed threshold alone; the stored ones, ``drift_thresholds`` too)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=NUMERICAL + ["prediction"], categorical_columns=CATEGORICAL)
    report = Report([DataDriftPreset(columns=FEATURES, drift_share=settings.drift_share,
                                     threshold=settings.drift_threshold),
                     ValueDrift(column="prediction", threshold=settings.drift_threshold)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = report.run(Dataset.from_pandas(_features(current), data_definition=definition),
                              Dataset.from_pandas(_features(reference), data_definition=definition))
    values: dict[str, float] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            column = config["column"]
            values["prediction_drift" if column == "prediction" else f"drift_{column}"] = float(metric["value"])
    if html is not None:
        reports.save(snapshot, html)
    return values


@dataclass
class Tally:
    """One model version's rides in a window, or in a slice of it: exact counts (quality, arms, zone pairs,
    labelled errors) that add up slice by slice, and a uniform sample of the rides for Evidently's drift."""

    rows: int = 0
    arms: pd.Series = dataclasses.field(default_factory=lambda: pd.Series(dtype=np.int64))
    missing: int = 0
    unknown_zones: int = 0  # pickup and drop-off zones that are "Unknown", counted apart
    distance_out: int = 0  # above the reference's 99.9th percentile, or not positive
    pairs: pd.Series = dataclasses.field(default_factory=lambda: pd.Series(dtype=np.int64))
    labelled: int = 0  # labelled rides the model is meant for, with their squared and absolute errors
    squared_error: float = 0.0
    absolute_error: float = 0.0
    shadow: int = 0
    shadow_squared_error: float = 0.0
    sample: pd.DataFrame | None = None

    @classmethod
    def of(cls, frame: pd.DataFrame, distance_cap: float, settings: Settings, share: float = 1.0,
           seed: int = 0) -> Tally:
        """The tally of ``frame`` (``logged_rides``' columns); ``share``: the sample's share of its rows."""
        distance = frame["trip_distance"]
        actual = frame["actual"]
        meant = frame[actual.notna() & (actual >= settings.min_duration) & (actual <= settings.max_duration)]
        error = meant["actual"].to_numpy(float) - meant["prediction"].to_numpy(float)
        shadow = meant[meant["shadow_prediction"].notna()]
        shadow_error = shadow["actual"].to_numpy(float) - shadow["shadow_prediction"].to_numpy(float)
        keep = np.random.default_rng(seed).random(len(frame)) < share if share < 1 else slice(None)
        return cls(len(frame), frame["arm"].value_counts(),
                   int(frame[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]].isna()
                       .any(axis=1).sum()),
                   int(frame["PULocationID"].isin(UNKNOWN_ZONES).sum() + frame["DOLocationID"].isin(UNKNOWN_ZONES)
                       .sum()),
                   int((distance > distance_cap).sum() + (distance <= 0).sum()),
                   pd.Series(zone_pair(frame["PULocationID"].to_numpy(np.int64),
                                       frame["DOLocationID"].to_numpy(np.int64))).value_counts(),
                   len(meant), float(np.sum(error**2)), float(np.sum(np.abs(error))), len(shadow),
                   float(np.sum(shadow_error**2)), frame[keep].reset_index(drop=True))

    def __add__(self, other: Tally) -> Tally:
        samples = [t.sample for t in (self, other) if t.sample is not None and len(t.sample)]
        return Tally(self.rows + other.rows, self.arms.add(other.arms, fill_value=0).astype(np.int64),
                     self.missing + other.missing, self.unknown_zones + other.unknown_zones,
                     self.distance_out + other.distance_out,
                     self.pairs.add(other.pairs, fill_value=0).astype(np.int64), self.labelled + other.labelled,
                     self.squared_error + other.squared_error, self.absolute_error + other.absolute_error,
                     self.shadow + other.shadow, self.shadow_squared_error + other.shadow_squared_error,
                     pd.concat(samples, ignore_index=True) if len(samples) > 1 else (samples or [None])[0])


def distance_cap(reference: Reference) -> float:
    return float(reference.frame["trip_distance"].quantile(0.999))


def measure(frame: pd.DataFrame, reference: Reference, settings: Settings,
            html: Path | None = None) -> list[tuple[str, float | None, float | None, bool | None]]:
    """(metric, value, threshold, breached) for one window's rows of one model version."""
    return measure_tally(Tally.of(frame, distance_cap(reference), settings), reference, settings, html)


def measure_tally(tally: Tally, reference: Reference, settings: Settings,
                  html: Path | None = None) -> list[tuple[str, float | None, float | None, bool | None]]:
    """``measure`` from a tally: counts and accuracy exact, drift on its sample (said, when it is one)."""
    rows = tally.rows
    out: list[tuple[str, float | None, float | None, bool | None]] = [("rows", float(rows), None, None)]
    out += [(f"rows_arm_{arm}", float(count), None, None) for arm, count in tally.arms.items()]
    ref = reference.frame
    if rows:
        out += [("missing_share", tally.missing / rows, None, None),
                ("unknown_zone_share", tally.unknown_zones / rows / 2, None, None),
                ("distance_out_of_range_share", tally.distance_out / rows, None, None)]
    if rows >= settings.min_window_rows:
        sample = tally.sample
        current = sample.assign(pickup_hour=sample["pickup_datetime"].dt.hour)
        values = drift_report(current, ref, settings, html)
        values["od_drift"] = od_drift_of_counts(reference.pairs, tally.pairs)
        # Each distance is the effect reported; it is drifted only past the fixed threshold *and* what sampling
        # noise reaches at the size of what was compared and the reference's (stats.null_quantile).
        limits = drift_thresholds(reference, len(sample), settings)
        features = [f"drift_{c}" for c in FEATURES]
        share = float(np.mean([values[f] >= limits[f] for f in features]))
        out.append(("drift_share", share, settings.drift_share, None))
        out += [(name, value, limits[name], None) for name, value in values.items()]
        if len(sample) < rows:
            out.append(("drift_sample_rows", float(len(sample)), None, None))
    # Accuracy on the rides the model is meant for, filtered like its validation rows (1-60 minutes).
    out.append(("labelled_rows", float(tally.labelled), None, None))
    if tally.labelled >= MIN_LABELLED_ROWS:
        rmse = float(np.sqrt(tally.squared_error / tally.labelled))
        out += [("rmse", rmse, None, None), ("mae", tally.absolute_error / tally.labelled, None, None),
                ("val_rmse", reference.val_rmse, None, None),
                ("rmse_ratio", rmse / reference.val_rmse, 1 + settings.rmse_increase, None)]
        if tally.shadow >= MIN_LABELLED_ROWS:
            out.append(("shadow_rmse", float(np.sqrt(tally.shadow_squared_error / tally.shadow)), None, None))
    # A value at or above its threshold is a breach.
    return [(m, v, t, None if t is None or v is None else bool(v >= t)) for m, v, t, _ in out]


def expected_rows(engine: Engine, window: Window, history: int = 4) -> float | None:
    """The usual traffic: the median of the rides of the ``history`` windows before this one."""
    m = window_metrics.c
    with engine.connect() as conn:
        totals = conn.execute(select(func.sum(m.value)).where(
            m.kind == window.kind, m.metric == "rows", m.window_start < window.start)
            .group_by(m.window_start).order_by(m.window_start.desc()).limit(history)).scalars().all()
    return float(np.median(totals)) if totals else None


SLICE_ROWS = 250_000  # a window is read from the store in time slices of about this many rides

# (function, slices) -> the function's result per slice: ``map`` in this process, or a Dask cluster's
# (tripcast.cluster.mapper): monitoring does not know which.
Mapper = Callable[[Callable[[Window], dict], Iterable[Window]], Iterable[dict]]


def rows_by_version(engine: Engine, window: Window) -> dict[str, int]:
    p = predictions.c
    with engine.connect() as conn:
        found = conn.execute(select(p.model_version, func.count()).where(
            p.pickup_datetime >= window.start, p.pickup_datetime < window.end).group_by(p.model_version)).all()
    return {str(version): int(count) for version, count in found}


def slices(window: Window, rows: int, rows_per_slice: int = SLICE_ROWS) -> list[Window]:
    """The window cut in equal spans of time, enough of them for about ``rows_per_slice`` rides each."""
    count = max(1, -(-rows // rows_per_slice))
    step = (window.end - window.start) / count
    edges = [window.start + step * k for k in range(count)] + [window.end]
    return [Window(window.kind, a, b) for a, b in zip(edges, edges[1:], strict=False)]


@dataclass(frozen=True)
class SliceTally:
    """Tallies a slice of a window per version: a picklable function, run wherever the mapper runs it."""

    store_url: str
    caps: dict[str, float]
    shares: dict[str, float]
    settings: Settings

    def __call__(self, part: Window) -> dict[str, Tally]:
        from tripcast.store import shared

        frame = logged_rides(shared(self.store_url), part.start, part.end, ride_ids=False)
        seed = int(part.start.timestamp())
        return {str(version): Tally.of(rides, self.caps[str(version)], self.settings, self.shares[str(version)],
                                       seed) for version, rides in frame.groupby("model_version", sort=True)}


def compute_window(engine: Engine, registry: Registry, window: Window, settings: Settings,
                   mapper: Mapper = map) -> list[dict]:
    """Measure a window for every model version that served in it, replacing earlier figures. The window is read
    in time slices (``mapper`` runs them); counts add up exactly, and Evidently's drift runs on a uniform sample
    of TRIPCAST_DRIFT_SAMPLE_ROWS rides per version (all of them in a smaller window)."""
    counts = rows_by_version(engine, window)
    computed_at = datetime.now(UTC).replace(tzinfo=None)
    expected = expected_rows(engine, window)
    references = {version: load_reference(registry, version, settings) for version in counts}
    work = SliceTally(engine.url.render_as_string(hide_password=False),
                      {version: distance_cap(reference) for version, reference in references.items()},
                      {version: min(1.0, settings.drift_sample_rows / n) for version, n in counts.items()}, settings)
    tallies: dict[str, Tally] = {}
    for part in mapper(work, slices(window, sum(counts.values()))):
        for version, tally in part.items():
            tallies[version] = tallies[version] + tally if version in tallies else tally
    rows: list[dict] = []
    folder = settings.home / "reports"
    for version, tally in sorted(tallies.items()):
        report = folder / f"{window.kind}-{window.start:%Y-%m-%d}-v{version}.html"
        measured = measure_tally(tally, references[version], settings, report if settings.reports_keep else None)
        if expected:  # traffic of the whole window against the usual
            measured.append(("rows_vs_expected", sum(counts.values()) / expected, None, None))
        has_report = settings.reports_keep > 0 and any(m == "drift_share" for m, *_ in measured)
        rows += [{"kind": window.kind, "window_start": window.start, "window_end": window.end,
                  "model_version": str(version), "metric": metric, "value": value, "threshold": threshold,
                  "breached": breached, "computed_at": computed_at,
                  "report": report.name if has_report else None}
                 for metric, value, threshold, breached in measured]
    with engine.begin() as conn:
        upsert(conn, window_metrics, rows, ["kind", "window_start", "model_version", "metric"])
    if settings.reports_keep and folder.is_dir():
        reports.prune(engine, folder, settings.reports_keep)
    return rows


@dataclass(frozen=True)
class LoggedSpan:
    """The prediction log's extent in event time, and where its bulk ends: a stray live ride (the README's
    /predict example is stamped now) must not move monitoring from a replayed year to empty weeks of today."""

    first: datetime
    last: datetime
    bulk_last: datetime  # the newest pickup in a window of at least ``min_rows`` rides
    after_bulk: int  # rides logged after it, in smaller windows

    def left_out(self, kind: str) -> str | None:
        """A line for the user when the default period leaves rides out, else None."""
        if not self.after_bulk:
            return None
        return (f"{self.after_bulk:,} ride(s) after {window_of(kind, self.bulk_last)} are in {kind}s too small "
                f"to measure; pass --until to include them")


MAX_SPARSE_WINDOWS = 520  # how far back past sparse windows the bulk is looked for (ten years of weeks)


def logged_span(engine: Engine, kind: str = "week", min_rows: int = 1) -> LoggedSpan | None:
    """First and last pickup in the prediction log, and the last of its bulk: walking back from the newest
    window, past windows of fewer than ``min_rows`` rides (two indexed queries per window)."""
    pickup = predictions.c.pickup_datetime
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(pickup), func.max(pickup))).one()
        if first is None:
            return None
        newest, skipped = last, 0
        for _ in range(MAX_SPARSE_WINDOWS):
            window = window_of(kind, newest)
            rows = conn.execute(select(func.count()).where(pickup >= window.start, pickup < window.end)).scalar_one()
            if rows >= min_rows:
                return LoggedSpan(first, last, newest, skipped)
            skipped += rows
            newest = conn.execute(select(func.max(pickup)).where(pickup < window.start)).scalar()
            if newest is None:
                break
    return LoggedSpan(first, last, last, 0)  # no window is large enough: the whole log it is
