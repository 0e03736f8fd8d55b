"""The Open Inference Protocol (V2 REST, as KServe, Seldon MLServer and Triton speak it) beside tripcast's own
endpoints: health, server and model metadata, and inference on the champion (the traffic policy choosing
each ride's arm) or on a version by number.

A V2 request is columnar: one typed tensor per input. Its tensors are checked against the protocol here
(datatype, shape, data), then validated, scored and logged exactly as ``/predict/batch`` does. Errors are
4xx with the protocol's ``{"error": "..."}`` body. JSON tensor data only: Triton's binary extension is refused
in words (tritonclient: ``binary_data=False``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tripcast.serving import columnar
from tripcast.serving.holder import ModelHolder
from tripcast.serving.schemas import RideColumns
from tripcast.serving.scoring import Scored, Scorer

PROTOCOL = "v2"
# The inputs a client may send, with the datatypes the protocol names for them; any integer datatype is taken
# for zones (and whole floats, as /predict takes 10.0), any number for the distance.
INPUTS = [{"name": "PULocationID", "datatype": "INT32", "shape": [-1]},
          {"name": "DOLocationID", "datatype": "INT32", "shape": [-1]},
          {"name": "trip_distance", "datatype": "FP64", "shape": [-1]},
          {"name": "pickup_datetime", "datatype": "BYTES", "shape": [-1],
           "parameters": {"optional": True, "content": "ISO 8601; naive means New York time; default now"}},
          {"name": "ride_id", "datatype": "BYTES", "shape": [-1], "parameters": {"optional": True}}]
OUTPUTS = [{"name": "duration", "datatype": "FP64", "shape": [-1], "parameters": {"unit": "minutes"}},
           {"name": "ride_id", "datatype": "BYTES", "shape": [-1]},
           {"name": "model_version", "datatype": "BYTES", "shape": [-1]},
           {"name": "arm", "datatype": "BYTES", "shape": [-1]}]
_INTEGERS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOATS = {"FP16", "FP32", "FP64"}
_ACCEPTED = {"PULocationID": _INTEGERS | _FLOATS, "DOLocationID": _INTEGERS | _FLOATS,
             "trip_distance": _INTEGERS | _FLOATS, "pickup_datetime": {"BYTES"}, "ride_id": {"BYTES"}}
_ELEMENT_TYPES = {**dict.fromkeys(_INTEGERS, (int,)), **dict.fromkeys(_FLOATS, (int, float)),
                  "BYTES": (str,), "BOOL": (bool,)}
_NUMPY = {t: np.dtype(t.lower().replace("fp", "float")) for t in _INTEGERS | _FLOATS}
BINARY_HEADER = "inference-header-content-length"  # Triton's binary tensor extension


class V2Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def parse_request(body: bytes, limit: int) -> tuple[RideColumns, str | None, list[str]]:
    """An inference request's rides, its id and the outputs asked for; V2Error(400) naming what is wrong."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise V2Error(400, f"the body is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error(400, 'an inference request is {"inputs": [{"name", "datatype", "shape", "data"}, ...]}')
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, "id: must be a string")
    columns: dict[str, np.ndarray | list] = {}
    for position, tensor in enumerate(request["inputs"]):
        name, values = _tensor(position, tensor, limit)
        if name in columns:
            raise V2Error(400, f"input {name} is given twice")
        columns[name] = values
    try:
        rides = columnar.ride_columns(columns, limit)
    except columnar.ColumnsError as exc:
        raise V2Error(400, str(exc)) from None
    return rides, request_id, _outputs(request.get("outputs"))


def _tensor(position: int, tensor: Any, limit: int) -> tuple[str, np.ndarray | list]:
    """One input tensor's name and its elements, flat, once its datatype, shape and data agree."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise V2Error(400, f"inputs[{position}]: a tensor is {{\"name\", \"datatype\", \"shape\", \"data\"}}")
    name, datatype, shape, data = tensor["name"], tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if name not in _ACCEPTED:
        raise V2Error(400, f"input {name[:100]!r} is not an input of this model: it takes "
                           f"{', '.join(_ACCEPTED)}")
    if not isinstance(datatype, str) or datatype not in _ELEMENT_TYPES:
        raise V2Error(400, f"input {name}: datatype {str(datatype)[:30]!r} is not one of the protocol's "
                           f"({', '.join(sorted(_ELEMENT_TYPES))})")
    if datatype not in _ACCEPTED[name]:
        wanted = next(i["datatype"] for i in INPUTS if i["name"] == name)
        raise V2Error(400, f"input {name}: datatype {datatype} is wrong for it: send {wanted}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) not in (1, 2) \
            or (len(shape) == 2 and shape[1] != 1):
        raise V2Error(400, f"input {name}: shape {str(shape)[:50]} is not [rides] or [rides, 1]")
    if not isinstance(data, list):
        raise V2Error(400, f"input {name}: data must be a list of {datatype} values")
    if data and isinstance(data[0], list):  # row-major nesting, as [rides, 1]
        if not all(isinstance(row, list) and len(row) == 1 for row in data):
            raise V2Error(400, f"input {name}: nested data must be [[value], [value], ...]")
        data = [row[0] for row in data]
    if len(data) != math.prod(shape):
        raise V2Error(400, f"input {name}: shape {shape} holds {math.prod(shape):,} values but data has "
                           f"{len(data):,}")
    if len(data) > limit:
        raise V2Error(413, f"input {name}: {len(data):,} rides: a request holds at most {limit:,}")
    allowed = _ELEMENT_TYPES[datatype]
    if not set(map(type, data)) <= set(allowed):
        i, value = next((i, v) for i, v in enumerate(data) if type(v) not in allowed)
        raise V2Error(400, f"input {name}[{i}]: {str(value)[:50]!r} is not a {datatype} value")
    if datatype == "BYTES":
        return name, data
    try:
        return name, np.asarray(data, dtype=_NUMPY[datatype])
    except OverflowError:
        raise V2Error(400, f"input {name}: a value is out of range for {datatype}") from None


def _outputs(requested: Any) -> list[str]:
    names = [o["name"] for o in OUTPUTS]
    if requested is None:
        return names
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in requested):
        raise V2Error(400, 'outputs: a list of {"name": ...}')
    unknown = [o["name"][:100] for o in requested if o["name"] not in names]
    if unknown:
        raise V2Error(400, f"outputs {unknown} are not outputs of this model: it gives {', '.join(names)}")
    return [o["name"] for o in requested]


def response(model_name: str, scored: Scored, request_id: str | None, outputs: list[str]) -> dict:
    columns = scored.columns()
    types = {o["name"]: o["datatype"] for o in OUTPUTS}
    return {"model_name": model_name, "model_version": scored.version_header,
            **({"id": request_id} if request_id is not None else {}),
            "outputs": [{"name": name, "datatype": types[name], "shape": [len(columns[name])],
                         "data": columns[name]} for name in outputs]}


def router(name: str, scorer: Scorer, champion: ModelHolder, limit: int,
           read_body: Callable[[Request], Awaitable[bytes]],
           log: Callable[[list[tuple]], Awaitable[None]]) -> APIRouter:
    """The V2 routes. ``read_body`` bounds a body; ``log`` journals a request's prediction-log rows."""
    routes = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
    not_found = {404: {"description": "unknown model or version"}}
    bad = {400: {"description": "the request breaks the protocol or a ride's rules"},
           413: {"description": "too many rides or too large a body"}} | not_found

    def model_problem(model: str, version: str | None = None) -> JSONResponse | None:
        if model != name:
            return error(404, f"unknown model {model[:100]!r}: this server serves {name!r}")
        if version is not None and version not in scorer.served():
            return error(404, str(scorer.not_served(version)))
        return None

    @routes.get("", summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "tripcast", "version": "1", "extensions": []}

    @routes.get("/health/live", summary="Server live")
    async def live() -> dict:
        return {"live": True}

    @routes.get("/health/ready", summary="Server ready (400 until a model is served, as the protocol says)",
                responses={400: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": champion.current is not None}, 200 if champion.current is not None else 400)

    @routes.get("/models/{model}", summary="Model metadata", responses=not_found)
    @routes.get("/models/{model}/versions/{version}", summary="Model version metadata", responses=not_found)
    async def metadata(model: str, version: str | None = None) -> Response:
        if problem := model_problem(model, version):
            return problem
        return JSONResponse({"name": name, "versions": [version] if version else list(scorer.served()),
                             "platform": "tripcast", "inputs": INPUTS, "outputs": OUTPUTS})

    @routes.get("/models/{model}/ready", summary="Model ready", responses=not_found)
    @routes.get("/models/{model}/versions/{version}/ready", summary="Model version ready", responses=not_found)
    async def model_ready(model: str, version: str | None = None) -> Response:
        if problem := model_problem(model, version):
            return problem
        ready = champion.current is not None
        return JSONResponse({"name": name, "ready": ready}, 200 if ready else 400)

    @routes.post("/models/{model}/infer", summary="Inference (the traffic policy picks each ride's arm)",
                 responses=bad | {503: {"description": "no model loaded"}}, openapi_extra=INFER_BODY)
    @routes.post("/models/{model}/versions/{version}/infer", summary="Inference on one served version",
                 responses=bad | {503: {"description": "no model loaded"}}, openapi_extra=INFER_BODY)
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        if problem := model_problem(model, version):
            return problem
        if BINARY_HEADER in request.headers:
            return error(400, "binary tensor data is not supported: send the tensors' data as JSON "
                              "(tritonclient: binary_data=False)")
        try:
            rides, request_id, outputs = parse_request(await read_body(request), limit)
        except V2Error as exc:
            return error(exc.status, str(exc))
        scored = scorer.many(rides, version)
        await log(scored.log_rows)
        return Response(orjson.dumps(response(name, scored, request_id, outputs), option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json",
                        headers={"X-Model-Version": scored.version_header})

    return routes


_TENSOR = {"type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
    "name": {"type": "string", "enum": [i["name"] for i in INPUTS]},
    "datatype": {"type": "string", "enum": sorted(_ELEMENT_TYPES)},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "parameters": {"type": "object"},
    "data": {"type": "array"}}}
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": [o["name"] for o in OUTPUTS]}, "parameters": {"type": "object"}}}}},
    "example": {"inputs": [{"name": "PULocationID", "datatype": "INT32", "shape": [1], "data": [10]},
                           {"name": "DOLocationID", "datatype": "INT32", "shape": [1], "data": [50]},
                           {"name": "trip_distance", "datatype": "FP64", "shape": [1], "data": [4.2]}]}}}}}}
