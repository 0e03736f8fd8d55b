"""Rides as columns (one array per input): from a JSON body, an Arrow IPC stream or Open Inference Protocol
tensors, validated a column at a time with numpy.

The limits and messages are a ride's (``schemas.Ride``): numpy finds the offending elements, and pydantic,
asked about those alone, words the problem exactly as it does for ``/predict``. The text columns (ride ids,
pickup times) are validated by pydantic as whole lists, in its Rust core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from tripcast.errors import TripcastError
from tripcast.features import ZONE_MAX, ZONE_MIN
from tripcast.serving.schemas import MAX_DISTANCE, Distance, Pickup, RideColumns, RideId, ZoneID

ZONES = ("PULocationID", "DOLocationID")
REQUIRED = (*ZONES, "trip_distance")
OPTIONAL = ("ride_id", "pickup_datetime")
INPUTS = REQUIRED + OPTIONAL
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PROBLEMS_PER_INPUT = 10  # a column of 10,000 bad values is named by its first ten
_ELEMENT = {"PULocationID": TypeAdapter(ZoneID), "DOLocationID": TypeAdapter(ZoneID),
            "trip_distance": TypeAdapter(Distance)}
_TEXT = {"ride_id": TypeAdapter(list[RideId | None]), "pickup_datetime": TypeAdapter(list[Pickup])}


class Problem(NamedTuple):
    input: str | None  # None: the request as a whole
    index: int | None  # None: the input as a whole
    msg: str
    type: str

    def __str__(self) -> str:
        where = self.input or "request"
        return f"{where}{'' if self.index is None else f'[{self.index}]'}: {self.msg}"


class ColumnsError(TripcastError):
    """The columns broke the rules; every problem found, each naming its input and element."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def ride_columns(columns: Mapping[str, Sequence | np.ndarray], limit: int) -> RideColumns:
    """Validated rides from their columns: Python lists (JSON) or numpy arrays (Arrow, V2 tensors)."""
    problems = [Problem(name, None, "Extra inputs are not permitted", "extra_forbidden")
                for name in columns if name not in INPUTS]
    problems += [Problem(name, None, "Field required", "missing") for name in REQUIRED if name not in columns]
    lengths = {name: len(values) for name, values in columns.items() if name in INPUTS}
    if len(set(lengths.values())) > 1:
        problems.append(Problem(None, None, "inputs differ in length: " + ", ".join(
            f"{name} {n:,}" for name, n in lengths.items()), "length_mismatch"))
    elif lengths and not 1 <= (n := next(iter(lengths.values()))) <= limit:
        problems.append(Problem(None, None, f"a batch holds 1 to {limit:,} rides, not {n:,}",
                                "too_short" if n < 1 else "too_long"))
    if problems:
        raise ColumnsError(problems)
    pu, do = (_numbers(name, columns[name], problems, whole=True) for name in ZONES)
    distance = _numbers("trip_distance", columns["trip_distance"], problems, whole=False)
    text = {name: _text(name, columns[name], problems) for name in OPTIONAL if name in columns}
    if problems:
        raise ColumnsError(problems)
    n = len(distance)
    ride_ids = text.get("ride_id") or [None] * n
    return RideColumns(ride_ids, text.get("pickup_datetime") or [None] * n, pu, do, distance)


def _numbers(name: str, values: Sequence | np.ndarray, problems: list[Problem], whole: bool) -> np.ndarray:
    """A numeric column, with its elements outside the input's rules reported as pydantic words them."""
    if isinstance(values, np.ndarray):
        array = values if values.dtype.kind in "iuf" else None
    else:
        # bool is an int to numpy (and to Python): refused by type, as pydantic's strict rules do
        array = np.asarray(values) if set(map(type, values)) <= {int, float} else None
        if array is not None and array.dtype.kind not in "iuf":  # an int beyond 64 bits
            array = None
    if array is None:
        bad = np.arange(len(values))  # each element is asked below; the well-typed ones pass
    elif array.dtype.kind == "f":
        ok = np.isfinite(array)
        with np.errstate(invalid="ignore"):
            if whole:
                ok &= (array % 1 == 0) & (array >= ZONE_MIN) & (array <= ZONE_MAX)
            else:
                ok &= (array >= 0) & (array <= MAX_DISTANCE)
        bad = np.flatnonzero(~ok)
    else:
        low, high = (ZONE_MIN, ZONE_MAX) if whole else (0, MAX_DISTANCE)
        bad = np.flatnonzero((array < low) | (array > high))
    found, checked = 0, []
    for i in bad.tolist():
        value = values[i]
        try:
            checked.append(_ELEMENT[name].validate_python(value.item() if isinstance(value, np.generic) else value))
        except ValidationError as exc:
            problems.append(Problem(name, i, exc.errors()[0]["msg"], exc.errors()[0]["type"]))
            found += 1
            if found == PROBLEMS_PER_INPUT:
                break
    if found:
        return np.empty(0)
    return array if array is not None else np.asarray(checked, dtype=np.int64 if whole else np.float64)


def from_json(body: Any, limit: int) -> RideColumns:
    """Rides from a parsed JSON body ``{"columns": {"PULocationID": [...], ...}}``."""
    columns = body.get("columns") if isinstance(body, dict) and set(body) == {"columns"} else None
    if not isinstance(columns, dict):
        raise ColumnsError([Problem(None, None, 'a columnar batch is {"columns": {"PULocationID": [...], '
                                                '"DOLocationID": [...], "trip_distance": [...]}}', "model_type")])
    not_lists = [Problem(name, None, "Input should be a valid list", "list_type")
                 for name, values in columns.items() if not isinstance(values, list)]
    if not_lists:
        raise ColumnsError(not_lists)
    return ride_columns(columns, limit)


def _text(name: str, values: Sequence | np.ndarray, problems: list[Problem]) -> list | None:
    values = values.tolist() if isinstance(values, np.ndarray) else list(values)
    try:
        return _TEXT[name].validate_python(values)
    except ValidationError as exc:
        problems += [Problem(name, e["loc"][0] if e["loc"] else None, e["msg"], e["type"])
                     for e in exc.errors()[:PROBLEMS_PER_INPUT]]
        return None


def from_arrow(body: bytes, limit: int) -> RideColumns:
    """Rides from an Arrow IPC stream (``application/vnd.apache.arrow.stream``), one column per input.
    Pickup times may be Arrow timestamps (naive: New York time) or ISO 8601 text; nulls are refused except in
    the optional columns."""
    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ColumnsError([Problem(None, None, f"not an Arrow IPC stream: {exc}"[:300], "arrow_invalid")]) from None
    columns: dict[str, Any] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if name in OPTIONAL or pa.types.is_string(column.type) or column.null_count:
            columns[name] = column.to_pylist()  # nulls stay None: refused by the numeric checks, by position
        else:
            columns[name] = column.to_numpy()
    return ride_columns(columns, limit)


def to_arrow(columns: Mapping[str, Sequence | np.ndarray]) -> bytes:
    """Named columns as an Arrow IPC stream."""
    table = pa.table(dict(columns))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
