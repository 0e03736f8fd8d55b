"""The monitoring store (SQLAlchemy): SQLite under TRIPCAST_HOME by default, PostgreSQL in production.

Serving writes the prediction log here; monitoring reads it.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, create_engine, event
from sqlalchemy.engine import Engine

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ride_id", String(128), nullable=False, index=True),
    Column("logged_at", DateTime, nullable=False, index=True),
    Column("pickup_datetime", DateTime),
    Column("PULocationID", Integer, nullable=False),
    Column("DOLocationID", Integer, nullable=False),
    Column("trip_distance", Float, nullable=False),
    Column("prediction", Float, nullable=False),
    Column("model_version", String(32), nullable=False, index=True),
    Column("arm", String(16), nullable=False),
    Column("source", String(16), nullable=False),  # api, batch, stream
    Column("shadow_prediction", Float),
    Column("shadow_version", String(32)),
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
        metadata.create_all(engine)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
