"""The TLC monthly trip files: catalogue, mirror, cached atomic downloads, validation, one canonical schema.

A month is fetched once into ``$TRIPCAST_HOME/data/<colour>/`` and read from there afterwards. A download is
written to a temporary file in the same folder, checked (parquet footer readable, expected columns present)
and only then renamed into place, so the cache never holds a partial or corrupt file.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from tenacity import RetryCallState, retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from tripcast.config import Settings
from tripcast.errors import CorruptFileError, DataError, MissingMonthError, SourceUnavailableError
from tripcast.files import atomic_path

log = logging.getLogger(__name__)

# Raw column names per colour -> canonical names. FHV files have no distance column; high-volume FHV calls it
# trip_miles. Yellow 2023-01's airport_fee (later Airport_fee) and other dtype changes lie outside these columns.
SCHEMAS: dict[str, dict[str, str]] = {
    "green": {
        "lpep_pickup_datetime": "pickup_datetime",
        "lpep_dropoff_datetime": "dropoff_datetime",
        "PULocationID": "PULocationID",
        "DOLocationID": "DOLocationID",
        "trip_distance": "trip_distance",
    },
    "yellow": {
        "tpep_pickup_datetime": "pickup_datetime",
        "tpep_dropoff_datetime": "dropoff_datetime",
        "PULocationID": "PULocationID",
        "DOLocationID": "DOLocationID",
        "trip_distance": "trip_distance",
    },
    "fhv": {
        "pickup_datetime": "pickup_datetime",
        "dropOff_datetime": "dropoff_datetime",
        "PUlocationID": "PULocationID",
        "DOlocationID": "DOLocationID",
    },
    "fhvhv": {
        "pickup_datetime": "pickup_datetime",
        "dropoff_datetime": "dropoff_datetime",
        "PULocationID": "PULocationID",
        "DOLocationID": "DOLocationID",
        "trip_miles": "trip_distance",
    },
}
COLORS = tuple(SCHEMAS)
# Months written by `tripcast data synth` (resampled rides in a colour's schema): "synth-green" and so on, a name
# in every file, folder and run, so that nobody takes them for the TLC's.
SYNTHETIC = "synth-"
CANONICAL_SCHEMA = pa.schema([("pickup_datetime", pa.timestamp("us")), ("dropoff_datetime", pa.timestamp("us")),
                              ("PULocationID", pa.int32()), ("DOLocationID", pa.int32()),
                              ("trip_distance", pa.float64())])
CANONICAL_COLUMNS = CANONICAL_SCHEMA.names
FIRST_MONTH = (2009, 1)  # the TLC's records start in 2009
_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str | Month) -> Month:
        if isinstance(text, Month):
            return text
        match = _MONTH_RE.match(str(text).strip())
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise DataError(f"malformed month {text!r}: expected YYYY-MM, e.g. 2021-01")
        month = cls(int(match.group(1)), int(match.group(2)))
        if (month.year, month.month) < FIRST_MONTH:
            raise DataError(f"month {month} is before the TLC's first published month (2009-01)")
        return month

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def shift(self, months: int) -> Month:
        index = self.year * 12 + self.month - 1 + months
        return Month(index // 12, index % 12 + 1)

    @property
    def start(self) -> pd.Timestamp:
        return pd.Timestamp(self.year, self.month, 1)

    @property
    def end(self) -> pd.Timestamp:
        """Exclusive end: the first instant of the next month."""
        return self.shift(1).start


def month_range(first: str | Month, last: str | Month) -> list[Month]:
    start, stop = Month.parse(first), Month.parse(last)
    if stop < start:
        raise DataError(f"empty month range: {start} is after {stop}")
    months = [start]
    while months[-1] < stop:
        months.append(months[-1].shift(1))
    return months


def month_label(months: list[Month]) -> str:
    """"2021-01" for one month, "2021-01..2021-03" for several."""
    return str(months[0]) if len(months) == 1 else f"{months[0]}..{months[-1]}"


def check_color(color: str) -> str:
    if color.removeprefix(SYNTHETIC) not in SCHEMAS:
        raise DataError(f"unknown colour {color!r}: choose one of {', '.join(COLORS)} (or {SYNTHETIC}<colour> for "
                        "months written by tripcast data synth)")
    return color


def schema_of(color: str) -> dict[str, str]:
    """Raw column -> canonical column for the colour (a synthetic colour has its model's schema)."""
    return SCHEMAS[check_color(color).removeprefix(SYNTHETIC)]


def file_name(color: str, month: str | Month) -> str:
    return f"{check_color(color)}_tripdata_{Month.parse(month)}.parquet"


def source_address(color: str, month: str | Month, settings: Settings) -> str:
    """Where the month is fetched from: the mirror when set, else the TLC's address."""
    base = settings.tlc_mirror or settings.tlc_base_url
    return f"{base.rstrip('/')}/{file_name(color, month)}"


def cache_path(color: str, month: str | Month, settings: Settings) -> Path:
    return settings.data_dir / check_color(color) / file_name(color, month)


def _local_path(address: str) -> Path | None:
    """A mirror given as a folder or a file:// URL; None for http(s)."""
    parsed = urlparse(address)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(address)


def validate_file(path: Path, color: str) -> int:
    """Check the footer and the columns; returns the row count. Raises CorruptFileError."""
    try:
        metadata = pq.ParquetFile(path).metadata
        names = set(metadata.schema.to_arrow_schema().names)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(f"{path.name} is not a readable parquet file ({exc})") from exc
    missing = sorted(set(schema_of(color)) - names)
    if missing:
        raise CorruptFileError(f"{path.name} lacks the {color} columns {missing}")
    return metadata.num_rows


class _TransientHTTPError(Exception):
    pass


def _download(url: str, target: Path, settings: Settings) -> None:
    def retrying(state: RetryCallState) -> None:  # said at once: offline, the retries took 15-30 s of silence
        error = state.outcome.exception() if state.outcome else None
        log.warning("download of %s failed (%s); attempt %d of %d in %.0f s", url.rsplit("/", 1)[-1],
                    type(error).__name__, state.attempt_number + 1, settings.download_retries,
                    state.next_action.sleep if state.next_action else 0)

    @retry(
        retry=retry_if_exception_type((requests.ConnectionError, requests.Timeout, _TransientHTTPError)),
        stop=stop_after_attempt(max(1, settings.download_retries)),
        wait=wait_exponential(multiplier=settings.download_backoff_seconds, max=30),
        before_sleep=retrying,
        reraise=True,
    )
    def attempt() -> None:
        with requests.get(url, stream=True, timeout=settings.download_timeout_seconds) as response:
            # The TLC's CloudFront answers 403 (not 404) for a file it does not have.
            if response.status_code in (403, 404):
                raise MissingMonthError(f"HTTP {response.status_code}")
            if response.status_code >= 500 or response.status_code == 429:
                raise _TransientHTTPError(f"HTTP {response.status_code} from {url}")
            response.raise_for_status()
            total = int(response.headers.get("content-length") or 0) or None
            with (
                open(target, "wb") as out,
                Progress(
                    "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    transient=True, disable=not settings.progress,
                ) as progress,
            ):
                task = progress.add_task(f"download {url.rsplit('/', 1)[-1]}", total=total)
                for chunk in response.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
            if total is not None and target.stat().st_size != total:
                raise _TransientHTTPError(f"{url}: got {target.stat().st_size} of {total} bytes")

    attempt()


def fetch(color: str, month: str | Month, settings: Settings) -> Path:
    """Return the cached file for the month, downloading (atomically, with retries) if needed."""
    month = Month.parse(month)
    dest = cache_path(color, month, settings)
    if dest.exists():
        try:
            validate_file(dest, color)
            return dest
        except CorruptFileError:
            dest.unlink()  # damaged after the fact: fetch it again
    address = source_address(color, month, settings)
    with atomic_path(dest) as tmp:
        local = _local_path(address)
        if local is not None:
            if not local.is_file():
                raise MissingMonthError(f"no {color} file for {month}: {local} does not exist")
            shutil.copyfile(local, tmp)
        else:
            try:
                _download(address, tmp, settings)
            except MissingMonthError as exc:
                raise MissingMonthError(f"no {color} file for {month} at {address} ({exc})") from None
            except (requests.RequestException, _TransientHTTPError) as exc:
                hint = (
                    f"the mirror TRIPCAST_TLC_MIRROR={settings.tlc_mirror} is unreachable"
                    if settings.tlc_mirror
                    else "offline? set TRIPCAST_TLC_MIRROR to a folder or URL holding the TLC files "
                    "(e.g. TRIPCAST_TLC_MIRROR=../shared/data/tlc)"
                )
                raise SourceUnavailableError(f"cannot download {address}: {exc.__class__.__name__}; {hint}") from None
        try:
            validate_file(tmp, color)
        except CorruptFileError as exc:
            raise CorruptFileError(f"{address} was rejected and not cached: {exc}") from None
    return dest


def normalise(table: pa.Table, color: str) -> pa.Table:
    """Rename to canonical names and cast: IDs int32 (null -> 0, an invalid zone the filters count),
    timestamps to microseconds, distance float64 (NaN for FHV, which has none)."""
    mapping = schema_of(color)
    table = table.rename_columns([mapping[name] for name in table.column_names])
    columns = {}
    for name in ("pickup_datetime", "dropoff_datetime"):
        columns[name] = table[name].cast(pa.timestamp("us"))
    for name in ("PULocationID", "DOLocationID"):
        columns[name] = pc.fill_null(table[name].cast(pa.int32()), 0)
    if "trip_distance" in table.column_names:
        columns["trip_distance"] = table["trip_distance"].cast(pa.float64())
    else:
        columns["trip_distance"] = pa.nulls(table.num_rows, pa.float64())
    return pa.table({name: columns[name] for name in CANONICAL_COLUMNS}, schema=CANONICAL_SCHEMA)


def _read_table(color: str, month: str | Month, settings: Settings) -> pa.Table:
    return normalise(pq.read_table(fetch(color, month, settings), columns=list(schema_of(color))), color)


def read_month(color: str, month: str | Month, settings: Settings) -> pd.DataFrame:
    """The month as a canonical frame (see CANONICAL_COLUMNS), fetched if not cached."""
    return _read_table(color, month, settings).to_pandas()


def read_months(color: str, months: list[Month], settings: Settings) -> pd.DataFrame:
    """Several months as one canonical frame (joined as Arrow tables: one conversion to pandas)."""
    return pa.concat_tables([_read_table(color, month, settings) for month in months]).to_pandas()


def cached_files(settings: Settings) -> Iterator[dict]:
    """What the cache holds: colour, month, rows, size, path."""
    folders = sorted(settings.data_dir.iterdir()) if settings.data_dir.is_dir() else []
    for color in [folder.name for folder in folders if folder.name.removeprefix(SYNTHETIC) in SCHEMAS]:
        folder = settings.data_dir / color
        for path in sorted(folder.glob(f"{color}_tripdata_*.parquet")):
            month = path.stem.rsplit("_", 1)[-1]
            yield {
                "color": color,
                "month": month,
                "rows": pq.ParquetFile(path).metadata.num_rows,
                "bytes": path.stat().st_size,
                "path": str(path),
            }


def month_exists(color: str, month: Month, settings: Settings) -> bool:
    """Whether the source publishes the month (a HEAD request, or a file test for a local mirror)."""
    address = source_address(color, month, settings)
    local = _local_path(address)
    if local is not None:
        return local.is_file()
    try:
        response = requests.head(address, timeout=settings.download_timeout_seconds, allow_redirects=True)
    except requests.RequestException as exc:
        raise SourceUnavailableError(f"cannot reach {address}: {exc.__class__.__name__}") from None
    return response.status_code == 200


def latest_months(color: str, settings: Settings, today: pd.Timestamp | None = None, look_back: int = 12):
    """(train, validation): the two most recent months the source has. The TLC publishes with a delay
    of about two months, so this walks back from the current month."""
    today = today or pd.Timestamp.now()
    month = Month(today.year, today.month)
    for _ in range(look_back):
        if month_exists(color, month, settings):
            return month.shift(-1), month
        month = month.shift(-1)
    source = settings.tlc_mirror or settings.tlc_base_url
    raise MissingMonthError(f"no {color} month found in the last {look_back} months at {source}")
