"""Months as Dask dataframes: one partition per slice of a file's row groups, normalised and filtered on the
worker by the same code as in-process (``tlc.normalise``, ``features.clean``), with the drop counts added up.

Workers read the files from the cache (TRIPCAST_HOME/data), which the command fills first (fetched and
validated as in-process): on a cluster of several machines that folder must be storage they all mount.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from tripcast import features as feats
from tripcast.config import Settings
from tripcast.data import tlc
from tripcast.errors import DataError
from tripcast.training import MonthData

ROWS_PER_PIECE = 1_000_000  # a partition: whole row groups up to about this many rides


@dataclass(frozen=True)
class Piece:
    """Row groups of one month's file, and the row (in the published file) its first ride is."""

    path: str
    color: str
    month: tlc.Month
    row_groups: tuple[int, ...]
    first_row: int


@dataclass(frozen=True)
class Filter:
    """``features.clean``'s arguments other than the rides and the month."""

    min_duration: float = -np.inf
    max_duration: float = np.inf
    max_distance: float | None = None

    @classmethod
    def training(cls, settings: Settings) -> Filter:
        return cls(settings.min_duration, settings.max_duration, settings.max_distance)


def pieces(color: str, months: list[tlc.Month], settings: Settings, rows: int | None = None) -> list[Piece]:
    """The months fetched into the cache (as in-process) and cut along their row groups."""
    rows = rows or ROWS_PER_PIECE
    found = []
    for month in months:
        path = tlc.fetch(color, month, settings)
        metadata = pq.ParquetFile(path).metadata
        groups: list[int] = []
        first = taken = 0
        for group in range(metadata.num_row_groups):
            groups.append(group)
            taken += metadata.row_group(group).num_rows
            if taken - first >= rows or group == metadata.num_row_groups - 1:
                found.append(Piece(str(path.resolve()), color, month, tuple(groups), first))
                groups, first = [], taken
    return found


def read_piece(piece: Piece, with_ids: bool = False) -> pd.DataFrame:
    """A piece in the canonical schema; ``ride_id`` as batch scoring names rides (the row in the published file)."""
    try:
        table = pq.ParquetFile(piece.path).read_row_groups(list(piece.row_groups), columns=list(
            tlc.schema_of(piece.color)))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"the Dask worker on {socket.gethostname()} cannot read {piece.path} ({exc}); workers "
                        "read months from TRIPCAST_HOME/data: on several machines, storage they all mount") from None
    rides = tlc.normalise(table, piece.color).to_pandas()
    if with_ids:
        rows = pd.RangeIndex(piece.first_row, piece.first_row + len(rides)).astype(str)
        rides["ride_id"] = f"{piece.color}-{piece.month}-" + rows
    return rides


def clean_piece(piece: Piece, rules: Filter, with_ids: bool = False) -> tuple[pd.DataFrame, feats.DropReport]:
    return feats.clean(read_piece(piece, with_ids), rules.min_duration, rules.max_duration, piece.month.start,
                       piece.month.end, rules.max_distance)


def drop_report(piece: Piece, rules: Filter) -> feats.DropReport:
    return clean_piece(piece, rules)[1]


def cleaned_rides(piece: Piece, rules: Filter) -> pd.DataFrame:
    return clean_piece(piece, rules)[0]


def months_frame(client: Client, color: str, months: list[tlc.Month], settings: Settings,
                 rules: Filter) -> tuple[object, feats.DropReport]:
    """(the months' filtered rides as a lazy Dask dataframe, the drop counts, added up on the cluster). The rides
    are read again where they are used: held in the workers' memory beside what is made of them, a month of 30M
    rides did not fit in two workers of 4 GB."""
    import dask.dataframe as dd

    month_pieces = pieces(color, months, settings)
    report = sum(client.gather(client.map(drop_report, month_pieces, rules=rules, pure=False)), feats.DropReport(0))
    meta = feats.clean(tlc.CANONICAL_SCHEMA.empty_table().to_pandas(), 0, 1)[0]
    return dd.from_map(cleaned_rides, month_pieces, rules=rules, meta=meta, enforce_metadata=False), report


def month_data(client: Client, color: str, months: list[tlc.Month], settings: Settings) -> MonthData:
    """``training.prepare_months`` on the cluster: the rides stay there, as a Dask frame."""
    rides, drops = months_frame(client, color, months, settings, Filter.training(settings))
    return MonthData(color, tlc.month_label(months), " ".join(tlc.source_address(color, m, settings) for m in months),
                     "", rides, drops, months[0].start.to_pydatetime(), months[-1].end.to_pydatetime())
