"""Columnar rides and Open Inference Protocol requests, parsed in-process: whatever a client sends is rides or a
named refusal, never another exception (which the API would answer with a 500)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripcast.serving import columnar, v2

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                                       max_size=4), max_leaves=20)
NAMES = st.sampled_from([*columnar.INPUTS, "tip"])
DATATYPES = st.sampled_from(["INT32", "INT8", "UINT64", "FP64", "FP16", "BYTES", "BOOL", "INT128"]) | JSON
TENSOR = st.fixed_dictionaries({"name": NAMES | JSON, "datatype": DATATYPES, "shape": JSON | st.lists(
    st.integers(-1, 4), max_size=3), "data": JSON | st.lists(JSON, max_size=4)})


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({"inputs": st.lists(TENSOR, max_size=4)}, optional={"id": JSON, "outputs": JSON})
       | JSON)
def test_any_v2_body_is_rides_or_a_4xx_naming_the_problem(body) -> None:
    try:
        rides, _, outputs = v2.parse_request(json.dumps(body).encode(), limit=3)
    except v2.V2Error as exc:
        assert 400 <= exc.status < 500 and str(exc)
        return
    assert 1 <= len(rides) <= 3 and set(outputs) <= {o["name"] for o in v2.OUTPUTS}


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(NAMES, st.lists(JSON, max_size=4) | JSON, max_size=6))
def test_any_columns_are_rides_or_problems_naming_input_and_element(columns) -> None:
    try:
        rides = columnar.from_json({"columns": columns}, limit=3)
    except columnar.ColumnsError as exc:
        assert exc.problems and all(p.msg for p in exc.problems)
        return
    assert 1 <= len(rides) <= 3 and ((rides.pu >= 1) & (rides.pu <= 265)).all()


@pytest.mark.parametrize("body", [b"", b"\x00" * 64, b"ARROW1\x00\x00garbage", columnar.to_arrow({"x": [1]})[:40]])
def test_a_broken_arrow_stream_is_a_named_refusal(body: bytes) -> None:
    with pytest.raises(columnar.ColumnsError, match="not an Arrow IPC stream|Field required"):
        columnar.from_arrow(body, limit=10)


def test_arrow_columns_of_any_type_are_validated_like_json() -> None:
    import pyarrow as pa

    rides = columnar.from_arrow(columnar.to_arrow({
        "PULocationID": pa.array([10, 74], pa.uint8()), "DOLocationID": pa.array([50.0, 75.0]),
        "trip_distance": pa.array([4, 1], pa.int16()),
        "pickup_datetime": pa.array([datetime(2021, 2, 1, 15, tzinfo=UTC), datetime(2021, 2, 1, 16, tzinfo=UTC)],
                                    pa.timestamp("us", tz="UTC"))}), limit=10)
    assert rides.pu.tolist() == [10, 74] and rides.do.tolist() == [50, 75] and rides.distance.tolist() == [4.0, 1.0]
    assert rides.pickup.tolist()[0].isoformat() == "2021-02-01T10:00:00"  # New York time
    with pytest.raises(columnar.ColumnsError) as refused:
        columnar.from_arrow(columnar.to_arrow({"PULocationID": pa.array([True, False]),
                                               "DOLocationID": pa.array(["50", "51"]),
                                               "trip_distance": pa.array([[1.0], [2.0]])}), limit=10)
    assert [(p.input, p.index, p.type) for p in refused.value.problems] == [
        ("PULocationID", 0, "zone_id"), ("PULocationID", 1, "zone_id"), ("DOLocationID", 0, "zone_id"),
        ("DOLocationID", 1, "zone_id"), ("trip_distance", 0, "float_type"), ("trip_distance", 1, "float_type")]
    assert np.isfinite(rides.distance).all()
