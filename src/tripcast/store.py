"""The monitoring store (SQLAlchemy): SQLite under TRIPCAST_HOME by default, PostgreSQL in production.

Serving writes the prediction log and the labels (feedback) here; monitoring reads them and writes its
window metrics, alerts and automation decisions beside them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import chain
from operator import itemgetter

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)
metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ride_id", String(128), nullable=False, index=True),
    # Only ride_id (label joins) and pickup_datetime (windows) are indexed: each index is written on every
    # logged prediction, and two more (logged_at, model_version: no query uses them) cost a third of the
    # insert's CPU on a 300,000-row table.
    Column("logged_at", DateTime, nullable=False),
    Column("pickup_datetime", DateTime, index=True),  # event time: monitoring windows are cut on it
    Column("PULocationID", Integer, nullable=False),
    Column("DOLocationID", Integer, nullable=False),
    Column("trip_distance", Float, nullable=False),
    Column("prediction", Float, nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("arm", String(16), nullable=False),
    Column("source", String(16), nullable=False),  # api, batch, stream
    Column("shadow_prediction", Float),
    Column("shadow_version", String(32)),
)

# Indexes tripcast 0.1 put on ``predictions``: every logged row wrote them, and no query reads them.
OBSOLETE_INDEXES = ("ix_predictions_logged_at", "ix_predictions_model_version")
# Held while a process creates the tables (PostgreSQL advisory lock); any number, the same in every process.
SCHEMA_LOCK = 0x7472697063617374  # "tripcast"

# Ground truth, as it arrives: an actual duration, or a drop-off time (the duration is then taken from the
# logged pickup). Kept even when no prediction with that ride_id is logged (yet).
labels = Table(
    "labels",
    metadata,
    Column("ride_id", String(128), primary_key=True),
    Column("actual_duration", Float),
    Column("dropoff_datetime", DateTime),
    Column("received_at", DateTime, nullable=False),
    Column("source", String(16), nullable=False),  # api, month
)

window_metrics = Table(
    "window_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # window length: day, week
    Column("window_start", DateTime, nullable=False, index=True),
    Column("window_end", DateTime, nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("value", Float),
    Column("threshold", Float),
    Column("breached", Boolean),
    Column("computed_at", DateTime, nullable=False),
    Column("report", String(256)),
    UniqueConstraint("kind", "window_start", "model_version", "metric"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule", String(32), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("window_start", DateTime, nullable=False),
    Column("window_end", DateTime, nullable=False, index=True),
    Column("model_version", String(32), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("value", Float),
    Column("threshold", Float),
    Column("message", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("delivered", Boolean),  # None: no webhook configured
    Column("attempts", Integer, nullable=False, default=0),
    Column("delivery_error", Text),
    UniqueConstraint("rule", "kind", "window_start", "model_version"),
)

# How far each journal of answered predictions (tripcast.serving.journal) is in this store, in bytes: updated in
# the transaction that writes its rows, so a journal left by a killed process is replayed from exactly there.
journal_offsets = Table(
    "journal_offsets",
    metadata,
    Column("journal", String(128), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# Every automation decision: retrain skipped (and why), challenger promoted or rejected (and why).
decisions = Table(
    "decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("event_time", DateTime, nullable=False, index=True),  # end of the window that triggered it
    Column("action", String(16), nullable=False),  # skipped, promoted, rejected, failed
    Column("reason", Text, nullable=False),
    Column("champion_version", String(32)),
    Column("challenger_version", String(32)),
    Column("champion_rmse", Float),
    Column("challenger_rmse", Float),
    Column("baseline_rmse", Float),
    Column("train_rows", Integer),
    Column("eval_rows", Integer),
    Column("data", Text),  # JSON: the periods used for training and evaluation, the run id
)


# Online experiments (champion vs challenger on live traffic) and guards (a new champion against the one it
# replaced, in shadow): one row each, and one row per look at their evidence.
experiments = Table(
    "experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # experiment, guard
    Column("mode", String(8), nullable=False),  # shadow, ab
    Column("weight", Float),  # ab: the challenger's share of rides
    Column("champion_version", String(32), nullable=False),  # the version answering (ab: the champion arm)
    Column("challenger_version", String(32), nullable=False),  # experiment: the candidate; guard: the old champion
    Column("status", String(16), nullable=False, index=True),  # running; promoted/rejected/stopped; passed/rolled_back
    Column("trigger", Text, nullable=False),
    Column("started_at", DateTime, nullable=False),  # wall clock: evidence is what was logged from then on
    Column("started_event", DateTime, nullable=False),  # event time: futility and the guard's period count from it
    Column("ended_at", DateTime),
    Column("ended_event", DateTime),
    Column("reason", Text),
)

experiment_looks = Table(
    "experiment_looks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False, index=True),
    Column("looked_at", DateTime, nullable=False),
    Column("event_time", DateTime, nullable=False),
    Column("rides", Integer, nullable=False),  # labelled rides of 1-60 minutes, the evidence
    Column("rides_challenger", Integer, nullable=False),
    Column("champion_rmse", Float),
    Column("challenger_rmse", Float),
    Column("estimate", Float),  # the challenger's RMSE below the champion's, relative (0.03: 3 % lower)
    Column("lower", Float),  # its confidence sequence's interval at this look
    Column("upper", Float),
    Column("decision", String(16), nullable=False),  # continue, promoted, rejected, rolled_back, passed
)


def connect(url: str, create: bool = True) -> Engine:
    """An engine for the store; tables are created on first use."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, **({"connect_args": {"timeout": 30}} if sqlite else {"pool_pre_ping": True}))
    if sqlite:
        # WAL: readers (monitoring) do not block the writer, and a commit is not an fsync of a rollback
        # journal; synchronous=NORMAL stays consistent after a crash of the application.
        event.listen(engine, "connect", _sqlite_pragmas)
    if create:
        _create_tables(engine)
        for name in OBSOLETE_INDEXES:  # a store made by an earlier tripcast: indexes nothing reads
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
            except DBAPIError as exc:  # e.g. a role that does not own it: slower inserts, not a broken store
                log.warning("could not drop the unused index %s: %s", name, str(exc.orig).strip())
    return engine


def _create_tables(engine: Engine) -> None:
    """Create the tables that are missing. Several processes may open a new store at once (API workers, the
    stream consumer, a flow): one creates them while the others wait for its commit and then find them;
    otherwise the losers failed on "already exists" (or, on PostgreSQL, a duplicate key in the catalogue)."""
    with engine.connect() as conn:
        if set(metadata.tables) <= set(inspect(conn).get_table_names()):
            return  # opening an existing store takes no lock
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        elif conn.dialect.name == "sqlite":  # the write lock first: sqlite3 runs DDL outside any transaction
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def shared(url: str) -> Engine:
    """One engine, so one connection pool, per store and process (flows and tasks call this many times).
    Made by one thread: the API's first requests arrive together, and each used to create the tables."""
    with _engines_lock:
        if url not in _engines:
            _engines[url] = connect(url)
        return _engines[url]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL is kept in the file, so only a new store's first connection switches it; but switching needs the
    # file to itself, and SQLite answers "locked" at once, without waiting, while another process opening the
    # same new store holds it.
    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cursor.execute("PRAGMA synchronous=NORMAL")
    # 64 MB of page cache instead of 2: the ride_id index takes random inserts, and once it outgrows the cache
    # each logged row reads pages back (a quarter of the insert's CPU on a 300,000-row table).
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def upsert(conn: Connection, table: Table, rows: Iterable[dict], keys: list[str]) -> int:
    """Insert rows, replacing those with the same ``keys`` (SQLite and PostgreSQL); returns how many keys."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    # One row per key, the last one, as separate statements would leave it: PostgreSQL refuses a statement
    # that touches a row twice ("ON CONFLICT DO UPDATE command cannot affect row a second time").
    rows = list({tuple(row[k] for k in keys): row for row in rows}.values())
    if not rows:
        return 0
    chunk = 30_000 // len(rows[0])  # both databases cap the bound parameters of one statement
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        statement = insert(table).values(part)
        updates = {c: statement.excluded[c] for c in part[0] if c not in keys}
        conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates))
    return len(rows)


# A prediction-log row is a tuple in this order (the table without its id); times as ``log_time`` text.
PREDICTION_COLUMNS = tuple(c.name for c in predictions.columns if c.name != "id")


def log_time(value: datetime | None = None) -> str:
    """A naive time (default: now, UTC) as the text SQLAlchemy itself stores on SQLite; PostgreSQL casts it on
    insert."""
    value = value or datetime.now(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ", timespec="microseconds")


def log_times(values: np.ndarray) -> list[str]:
    """``log_time`` for an array of datetime64, vectorised: numpy's ISO text with a space for its 'T'."""
    if len(values) and (values == values[0]).all():  # a batch without pickup times: all picked up "now"
        return [log_time(values[0].astype("datetime64[us]").item())] * len(values)
    text = values.astype("datetime64[us]").astype("S26")
    text.view(np.uint8).reshape(-1, 26)[:, 10] = ord(" ")
    return text.astype("U26").tolist()


def insert_predictions(conn: Connection, rows: list[tuple]) -> None:
    """Insert prediction-log rows through the driver, in a thread that shares the GIL with requests.

    PostgreSQL: COPY (psycopg formats rows in C; 10,000 rows cost ~20 ms of CPU where multi-row INSERTs cost
    ~320 and executemany ~100). SQLite: multi-row VALUES statements of a hundred rows, one release of the GIL
    each, where executemany would take one per row and SQLAlchemy's insert would convert every value in Python.
    """
    # In ride_id order, the ride_id index takes a transaction's rows in one sweep instead of at random pages:
    # on a 2M-row SQLite store, ~40 % less CPU per row. The sort is stable: a ride's own rows keep their order.
    rows = sorted(rows, key=itemgetter(0))
    columns = ", ".join(f'"{c}"' for c in PREDICTION_COLUMNS)
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cursor, \
                cursor.copy(f"COPY predictions ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    group = f"({', '.join(['?'] * len(PREDICTION_COLUMNS))})"
    # Rows per statement. Binding holds the GIL (~0.2 ms a hundred rows) while the request path waits; between
    # statements the GIL is handed back, and winning it again from a busy request path takes up to 5 ms (the
    # interpreter's switch interval). A few thousand rides' rows (single rides) go a hundred at a time; a
    # transaction of batches in a few large statements, or the writer falls behind (7x slower, 10,000 rows).
    most = conn.connection.driver_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(PREDICTION_COLUMNS)
    chunk = min(max(100, len(rows) // 8), most)
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        conn.exec_driver_sql(f"INSERT INTO predictions ({columns}) VALUES " + ", ".join([group] * len(part)),
                             tuple(chain.from_iterable(part)))


def jsonable(row, leave_out: tuple[str, ...] = ()) -> dict:
    """A row (mapping) with its datetimes as ISO 8601 text, for JSON: webhooks, API answers, decision data."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items() if k not in leave_out}


def record_labels(engine: Engine, rows: list[dict], source: str) -> dict:
    """Store labels (ride_id plus actual_duration or dropoff_datetime), replacing earlier ones for the same
    rides. Returns how many were stored and which ride_ids have no logged prediction (yet): those are kept,
    and join their prediction if it is logged later."""
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [{"ride_id": r["ride_id"], "actual_duration": r.get("actual_duration"),
             "dropoff_datetime": r.get("dropoff_datetime"), "received_at": now, "source": source} for r in rows]
    ids = list(dict.fromkeys(r["ride_id"] for r in rows))  # a ride labelled twice is stored (and counted) once
    known: set[str] = set()
    with engine.begin() as conn:
        stored = upsert(conn, labels, rows, ["ride_id"])
        for i in range(0, len(ids), 10_000):
            part = ids[i:i + 10_000]
            known.update(conn.execute(select(predictions.c.ride_id).where(predictions.c.ride_id.in_(part)))
                         .scalars())
    return {"stored": stored, "unknown": [i for i in ids if i not in known]}
