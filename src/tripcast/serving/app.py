"""The online API: predictions from the model a registry alias points at, with every prediction logged.

Run with ``tripcast serve`` (uvicorn). The model is always resolved from the registry by alias, never a path.
"""

import asyncio
import base64
import functools
import gc
import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import validation_error_definition, validation_error_response_definition
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect

from tripcast.config import Settings, load_settings
from tripcast.monitoring import dashboard, experiments
from tripcast.registry import CHALLENGER, Registry
from tripcast.serving import columnar, v2, webhooks
from tripcast.serving.holder import AliasWatcher, ModelHolder
from tripcast.serving.http import TIMED_OUT
from tripcast.serving.predlog import PredictionLog
from tripcast.serving.schemas import RIDE, RideColumns, column_batch, label_batch, log_features, ride_batch
from tripcast.serving.scoring import NoModelError, Scorer, UnknownVersionError
from tripcast.serving.traffic import TrafficFollower, TrafficPolicy
from tripcast.store import record_labels, shared

# As monitoring names its reports, and the script and font they share.
REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.(html|js|woff2)")
REPORT_TYPES = {"html": "text/html", "js": "application/javascript", "woff2": "font/woff2"}
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's setting: where worker processes share metrics
RELOAD_SIGNAL = "TRIPCAST_RELOAD_SIGNAL"  # a file the workers of one `tripcast serve` share (AliasWatcher)


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class Prediction(BaseModel):
    ride_id: str
    duration: float = Field(description="minutes")
    model: ModelRef
    arm: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


class PredictionColumns(BaseModel):
    ride_id: list[str]
    duration: list[float] = Field(description="minutes")
    model_version: list[str]
    arm: list[str]


class ColumnarBatchPrediction(BaseModel):
    predictions: PredictionColumns
    models: dict[str, ModelRef] = Field(description="arm -> the model that answered its rides")


class Metrics:
    """The API's Prometheus metrics. With several worker processes (``PROMETHEUS_MULTIPROC_DIR``, set by
    ``tripcast serve --workers N``) each process writes its figures to files and a scrape, whichever worker
    answers it, adds them up; the gauges' modes say how (ignored with one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        if self.multiprocess:
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
        else:
            self.exposed = self.registry
        self.requests = Counter("tripcast_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("tripcast_request_seconds", "Request latency", ["path"], registry=r,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.predictions = Counter("tripcast_predictions", "Rides predicted", ["version", "arm"], registry=r)
        self.queue_depth = Gauge("tripcast_log_queue_depth", "Predictions waiting to be logged", registry=r,
                                 multiprocess_mode="livesum")
        self.logs_dropped = Gauge("tripcast_log_dropped", "Predictions not logged (the journal refused them: at "
                                  "its size limit, or a full disk)", registry=r, multiprocess_mode="sum")
        self.logs_backlog = Gauge("tripcast_log_journal_backlog_bytes", "Answered predictions in the journal, not yet "
                                  "in the store (the store down, or behind)", registry=r, multiprocess_mode="livesum")
        self.logs_replayed = Gauge("tripcast_log_replayed", "Predictions written to the store from a journal (not "
                                   "kept in memory, or left by a process that stopped)", registry=r,
                                   multiprocess_mode="sum")
        self.logs_written = Gauge("tripcast_log_written", "Predictions written to the store", registry=r,
                                  multiprocess_mode="sum")
        self.store_up = Gauge("tripcast_log_store_up", "1 if the monitoring store accepted the last write",
                              registry=r, multiprocess_mode="livemin")
        self.reloads = Gauge("tripcast_model_reloads", "Model versions loaded", ["alias"], registry=r,
                             multiprocess_mode="sum")
        self.reload_failures = Gauge("tripcast_model_reload_failures", "Failed model loads", ["alias"], registry=r,
                                     multiprocess_mode="sum")
        self.refused = Gauge("tripcast_model_refused_versions", "Versions refused: they failed verification",
                             ["alias"], registry=r, multiprocess_mode="livemax")
        self.served_version = Gauge("tripcast_served_version", "Version served per alias (the oldest any worker "
                                    "serves)", ["alias"], registry=r, multiprocess_mode="livemin")
        self.experiment = Gauge("tripcast_experiment", "The running experiment (or guard): its latest look's labelled "
                                "rides, estimate (the challenger's RMSE below the champion's) and interval",
                                ["metric", "kind", "mode", "champion", "challenger"], registry=r,
                                multiprocess_mode="livemostrecent")
        self.monitoring = Gauge("tripcast_monitoring", "Latest monitoring window's figures", ["metric", "version"],
                                registry=r, multiprocess_mode="livemostrecent")
        # Labelled children, looked up once per label set: ``labels()`` costs more than ``inc()`` per request.
        self.request_count = functools.cache(lambda path, status: self.requests.labels(path, str(status)))
        self.request_latency = functools.cache(lambda path: self.latency.labels(path))
        self.prediction_count = functools.cache(lambda version, arm: self.predictions.labels(version, arm))


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): counts requests by status and times them."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = metric_path(scope["path"])
            self.metrics.request_count(path, status).inc()
            self.metrics.request_latency(path).observe(time.perf_counter() - started)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 past ``limit`` bytes before it is all in memory (a declared
    length is checked first; a chunked body as it arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared):,} bytes: the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validated(adapter: TypeAdapter, body: bytes):
    """The body, parsed and validated from JSON bytes; otherwise a 422 naming each field (``body.<field>``)."""
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def json_body(name: str) -> dict:
    """OpenAPI for a route that validates its JSON body itself: the schema ``name`` from the components, and
    the 422 that FastAPI documents only for the bodies it validates."""
    return {"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"413": {"description": "body too large"},
                          "422": {"description": "Validation Error", "content": {
                              "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}}}


def document_bodies(app: FastAPI, bodies: dict[str, TypeAdapter]) -> None:
    """Add the schemas of self-validated bodies, and of FastAPI's 422 answer, to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.setdefault("HTTPValidationError", validation_error_response_definition)
            components.setdefault("ValidationError", validation_error_definition)
            for name, adapter in bodies.items():
                body = adapter.json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}) | {name: body})
        return app.openapi_schema

    app.openapi = openapi


# A body whose first key is "columns" is the columnar form of a batch (one look at its start, no parse).
COLUMNAR_JSON = re.compile(rb'\s*\{\s*"columns"\s*:')
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/RideBatch"},
                                              {"$ref": "#/components/schemas/ColumnBatch"}]}},
    columnar.ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}}
BATCH_RESPONSES = {
    200: {"description": "in the request's orientation", "content": {
        "application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/BatchPrediction"},
                                                  {"$ref": "#/components/schemas/ColumnarBatchPrediction"}]}},
        columnar.ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}},
    413: {"description": "body too large"}, 503: {"description": "no model loaded"},
    422: {"description": "Validation Error", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}}


def metric_path(path: str) -> str:
    """The path as a metric label: the V2 routes by kind (their paths carry model names)."""
    if path in _KNOWN_PATHS:
        return path
    if path.startswith("/v2/"):
        return "/v2/infer" if path.endswith("/infer") else "/v2"
    return "other"


NO_VIEWER_TOKEN = {401: {"description": "TRIPCAST_VIEWER_TOKEN is set, and neither it nor the admin token given"}}
_KNOWN_PATHS = {"/predict", "/predict/batch", "/health", "/ready", "/model", "/metrics", "/admin/reload",
                "/feedback", "/dashboard", "/dashboard/data"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    registry = Registry(settings)
    champion = ModelHolder(registry, settings.serve_alias, fall_back=True)
    # The challenger is served (A/B) or scored (shadow) as the running experiment asks, read from the registry
    # at every poll; without one, as TRIPCAST_TRAFFIC_MODE says.
    traffic = TrafficFollower(registry, TrafficPolicy(settings.traffic_mode, settings.challenger_weight))
    challenger = ModelHolder(registry, CHALLENGER, needed=lambda: traffic.policy.uses_challenger)
    holders = [champion, challenger]
    metrics = Metrics()

    def shadow_scores(rows: list[tuple]) -> tuple[list[float], str] | None:
        model = challenger.current if traffic.policy.shadow else None
        if model is None:
            return None
        features = log_features(rows, model.pipeline.preprocessor)
        return model.pipeline.predict_features(features).tolist(), model.version

    predlog = PredictionLog.from_settings(settings, shadow=shadow_scores)

    async def durable(offset: int) -> None:
        """Rows are journaled (safe from this process dying) by ``put``; with TRIPCAST_LOG_FSYNC=always the
        answer also waits for the disk, in a thread, so that concurrent requests share one fsync."""
        if settings.log_fsync == "always":
            await run_in_threadpool(predlog.wait_durable, offset)
    scorer = Scorer(champion, challenger, lambda: traffic.policy, "api",
                    count=lambda version, arm, n: metrics.prediction_count(version, arm).inc(n))
    watcher = AliasWatcher([traffic, *holders], settings.poll_seconds,  # the policy first: it says what to load
                           Path(os.environ[RELOAD_SIGNAL]) if os.environ.get(RELOAD_SIGNAL) else None)
    # The store's engine is made on first use (in a worker thread), not at start: the store may be down then.
    store_url = settings.resolved_monitoring_uri
    batch = ride_batch(settings.batch_limit)
    # A full batch is ~1 MB; 2 KB a ride leaves room for long ids and pretty-printed JSON, and bounds the
    # memory one request can take.
    max_body = max(1 << 20, 2048 * settings.batch_limit)
    labels = label_batch(settings.batch_limit)

    def publish() -> None:
        """This worker's figures into its gauges. With several workers a scrape is answered by one of them, from
        every worker's last published figures: each publishes every second, or the others' figures were as old
        as their last scrape (a new server said the store was down, and an outage could go unseen)."""
        metrics.queue_depth.set(predlog.depth)
        metrics.logs_dropped.set(predlog.dropped)
        metrics.logs_backlog.set(predlog.backlog_bytes)
        metrics.logs_replayed.set(predlog.replayed)
        metrics.logs_written.set(predlog.written)
        metrics.store_up.set(1 if predlog.store_up else 0)
        for holder in holders:
            metrics.reloads.labels(holder.alias).set(holder.reloads)
            metrics.reload_failures.labels(holder.alias).set(holder.failures)
            metrics.refused.labels(holder.alias).set(len(holder.refused))
            metrics.served_version.labels(holder.alias).set(int(holder.current.version) if holder.current else 0)

    async def publish_every_second() -> None:
        while True:
            publish()
            await asyncio.sleep(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        publisher = asyncio.create_task(publish_every_second()) if metrics.multiprocess else None
        for follower in (traffic, *holders):
            await run_in_threadpool(follower.refresh)
        # Everything loaded so far (MLflow, pandas, the models: ~300k objects) lives as long as the process.
        # Left in the collector's oldest generation, each full collection walks it all, a ~150 ms pause of
        # every request in flight; frozen, the collector only walks what requests allocate.
        gc.freeze()
        watcher.start()
        predlog.start()
        yield
        watcher.stop()
        await run_in_threadpool(predlog.stop)
        if publisher is not None:
            publisher.cancel()
        if metrics.multiprocess:  # this worker's "live" gauges leave the sums
            multiprocess.mark_process_dead(os.getpid())

    # /docs and /redoc with their scripts served by the API itself (FastAPI's default loads them from a CDN: a
    # blank page on an isolated network).
    app = FastAPIOffline(title="tripcast", version="1", lifespan=lifespan, static_url="/docs/static",
                         description="NYC taxi trip duration predictions from the MLflow registry's champion.")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    document_bodies(app, {"Ride": RIDE, "RideBatch": batch, "ColumnBatch": column_batch(settings.batch_limit),
                          "LabelBatch": labels, "BatchPrediction": TypeAdapter(BatchPrediction),
                          "ColumnarBatchPrediction": TypeAdapter(ColumnarBatchPrediction)})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody to answer: counted as 499 (nginx's "client closed request"), or 408 when the body timed out,
        # not as a 500 with a traceback. uvicorn sends nothing to a closed connection.
        return Response(status_code=408 if request.scope.get(TIMED_OUT) else 499)

    @app.exception_handler(columnar.ColumnsError)
    async def invalid_columns(request: Request, exc: columnar.ColumnsError) -> JSONResponse:
        errors = [{"loc": ["body", "columns", *([p.input] if p.input else []), *([] if p.index is None else [p.index])],
                   "msg": p.msg, "type": p.type} for p in exc.problems]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(UnknownVersionError)
    async def unknown_version(request: Request, exc: UnknownVersionError) -> JSONResponse:
        return v2.error(404, str(exc))  # the served versions changed while the request was read

    @app.exception_handler(NoModelError)
    async def no_model(request: Request, exc: NoModelError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One message per field. The offending input is not echoed: it may be NaN, which JSON cannot carry.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    # The routes with a body read it raw and validate it in one pass (pydantic-core, from bytes: malformed or
    # non-UTF-8 JSON is a 422 like any bad field); the prediction routes also write their own JSON. FastAPI's
    # parse-then-validate and its response-model round trip cost more per request than the model. The bodies'
    # schemas are still in the OpenAPI document (``document_bodies``).
    @app.post("/predict", response_model=Prediction, openapi_extra=json_body("Ride"),
              responses={503: {"description": "no model loaded"}})
    async def predict(request: Request) -> Response:
        result, rows = scorer.one(validated(RIDE, await read_body(request, max_body)))
        await durable(predlog.put(rows))
        return Response(orjson.dumps(result), media_type="application/json",
                        headers={"X-Model-Version": result["model"]["version"]})

    @app.post("/predict/batch", openapi_extra=BATCH_BODY, responses=BATCH_RESPONSES)
    async def predict_batch(request: Request) -> Response:
        """A batch of rides: ``{"rides": [...]}`` (one object per ride), ``{"columns": {...}}`` (one list per
        input) or an Arrow IPC stream (one column per input). The answer comes in the same orientation."""
        body = await read_body(request, max_body)
        if request.headers.get("content-type", "").startswith(columnar.ARROW_STREAM):
            scored = scorer.many(columnar.from_arrow(body, settings.batch_limit))
            await log_rows(scored.log_rows)
            return Response(columnar.to_arrow(scored.columns()), media_type=columnar.ARROW_STREAM,
                            headers={"X-Model-Version": scored.version_header})
        if COLUMNAR_JSON.match(body):
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise RequestValidationError([{"loc": ("body",), "msg": f"Invalid JSON: {exc}",
                                               "type": "json_invalid"}]) from None
            scored = scorer.many(columnar.from_json(parsed, settings.batch_limit))
            content = {"predictions": scored.columns(), "models": scored.refs}
        else:
            scored = scorer.many(RideColumns.from_rides(validated(batch, body)["rides"]))
            content = {"predictions": scored.records()}
        await log_rows(scored.log_rows)
        return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                        headers={"X-Model-Version": scored.version_header})

    async def log_rows(rows: list[tuple]) -> None:
        await durable(predlog.put(rows))

    app.include_router(v2.router(settings.model_name, scorer, champion, settings.batch_limit,
                                 lambda request: read_body(request, max_body), log_rows))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "no model to serve yet"}})
    async def ready(response: Response) -> dict:
        """200 while a model answers, even if something else fails (``problems`` says what): predictions still
        flow, and wait in the journal while the monitoring store is down. 503 until a model is served."""
        if champion.current is None:
            response.status_code = 503
        return {"ready": champion.current is not None, "alias": champion.alias,
                "version": champion.current.version if champion.current else None,
                "last_reload_error": champion.last_error, "refused": champion.refused, "fallback": champion.fallback,
                "problems": problems(), "prediction_log": predlog.health()}

    def problems() -> list[str]:
        """What is failing, in words, for /ready (and whoever reads it)."""
        found = [f"{h.alias}: {h.last_error}" for h in holders if h.last_error]
        found += [f"{h.alias}: version {v} refused: {why}" for h in holders for v, why in h.refused.items()
                  if v == h.wanted]
        if not predlog.store_up:
            found.append(f"monitoring store unavailable ({predlog.last_error}): predictions wait in the journal "
                         f"({predlog.backlog_bytes:,} bytes)")
        if predlog.dropped:
            found.append(f"prediction log: {predlog.dropped:,} predictions dropped ({predlog.last_error})")
        return found

    def viewer(authorization: Annotated[str | None, Header()] = None) -> None:
        """With TRIPCAST_VIEWER_TOKEN set, /dashboard and /metrics want it (or the admin token): as a Bearer token
        (Prometheus), or as the password of HTTP basic auth, which a browser asks for and then sends itself."""
        if not settings.viewer_token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except ValueError:  # not base64, or not UTF-8
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        if not any(token and secrets.compare_digest(given.encode(), token.encode())
                   for token in (settings.viewer_token, settings.admin_token)):
            raise HTTPException(401, "the dashboard and /metrics need the viewer token (TRIPCAST_VIEWER_TOKEN), as "
                                     "'Authorization: Bearer <token>' or a basic-auth password",
                                headers={"WWW-Authenticate": 'Basic realm="tripcast", charset="UTF-8"'})

    @app.get("/model")
    async def model() -> dict:
        # With several workers, these are the answering worker's figures (/metrics sums them all).
        policy = traffic.policy
        return {"worker": os.getpid(), "traffic": {"mode": policy.mode, "challenger_weight": policy.challenger_weight,
                                                   "experiment": policy.experiment},
                "champion": champion.state(), "challenger": challenger.state(), "prediction_log": predlog.health()}

    # documented as text: Prometheus' exposition format
    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(viewer)],
             responses=NO_VIEWER_TOKEN)
    async def prometheus() -> Response:
        publish()
        try:
            latest = await run_in_threadpool(lambda: dashboard.latest(shared(store_url), settings.window))
            ongoing = await run_in_threadpool(lambda: experiments.current(shared(store_url)))
        except SQLAlchemyError:
            latest, ongoing = [], None
        if not metrics.multiprocess:  # prometheus_client cannot clear labels across processes
            metrics.monitoring.clear()
            metrics.experiment.clear()
        if ongoing is not None:
            labels = (ongoing["kind"], ongoing["mode"], ongoing["champion_version"], ongoing["challenger_version"])
            look = ongoing["look"] or {}
            for name in ("rides", "estimate", "lower", "upper"):
                if look.get(name) is not None:
                    metrics.experiment.labels(name, *labels).set(look[name])
        for row in latest:
            if row["value"] is not None:
                metrics.monitoring.labels(row["metric"], row["model_version"]).set(row["value"])
        return Response(generate_latest(metrics.exposed), media_type=CONTENT_TYPE_LATEST)

    def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if not settings.admin_token:
            raise HTTPException(403, "admin endpoints are disabled: set TRIPCAST_ADMIN_TOKEN")
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing 'Authorization: Bearer <token>' header",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(authorization.removeprefix("Bearer ").encode(), settings.admin_token.encode()):
            raise HTTPException(403, "wrong admin token")

    async def admin_or_webhook(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        if webhooks.SIGNATURE.lower() not in request.headers or not settings.admin_token:
            return admin(authorization)  # also refuses everything when no admin token is set
        problem = webhooks.signature_problem(settings.admin_token, dict(request.headers),
                                             await read_body(request, webhooks.MAX_BODY))
        if problem:
            raise HTTPException(403, problem)

    @app.post("/admin/reload", dependencies=[Depends(admin_or_webhook)],
              responses={401: {"description": "no token"}, 403: {"description": "wrong token or signature"}})
    async def reload() -> dict:
        """Check the registry now instead of waiting for the poll: with the admin token, or as an MLflow registry
        webhook signed with it (``tripcast models webhook``). With several workers, every worker checks (the
        one answering reports)."""
        await run_in_threadpool(traffic.refresh)
        changed = {h.alias: await run_in_threadpool(h.refresh) for h in holders}
        watcher.announce()  # the other workers check too
        return {alias: {"changed": changed[alias], "version": h.current.version if h.current else None,
                        "last_reload_error": h.last_error} for alias, h in zip(changed, holders, strict=True)} | {
                "traffic": {"mode": traffic.policy.mode, "experiment": traffic.policy.experiment}}

    @app.post("/feedback", dependencies=[Depends(admin)], openapi_extra=json_body("LabelBatch"),
              responses={401: {"description": "no token"}, 403: {"description": "wrong token"},
                         503: {"description": "monitoring store unavailable"}})
    async def feedback(request: Request) -> dict:
        """Actual durations (or drop-off times) of served rides, matched to logged predictions by ride_id.
        Labels for ride_ids with no logged prediction (yet) are kept and reported as ``unknown``."""
        rows = [label.row() for label in validated(labels, await read_body(request, max_body)).labels]
        try:
            result = await run_in_threadpool(lambda: record_labels(shared(store_url), rows, "api"))
        except SQLAlchemyError as exc:
            raise HTTPException(503, f"monitoring store unavailable, labels not stored: retry "
                                     f"({type(exc).__name__})") from None
        return {"stored": result["stored"], "unknown": len(result["unknown"]),
                "unknown_ride_ids": result["unknown"][:1000]}

    @app.get("/dashboard", response_class=HTMLResponse, dependencies=[Depends(viewer)],
             responses=NO_VIEWER_TOKEN | {503: {"description": "store unavailable"}})
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(dashboard.page(await monitoring_data()))

    @app.get("/dashboard/data", dependencies=[Depends(viewer)],
             responses=NO_VIEWER_TOKEN | {503: {"description": "store unavailable"}})
    async def dashboard_data() -> dict:
        return await monitoring_data()

    async def monitoring_data() -> dict:
        try:
            return await run_in_threadpool(lambda: dashboard.data(shared(store_url), settings))
        except SQLAlchemyError as exc:
            raise HTTPException(503, f"monitoring store unavailable ({type(exc).__name__})") from None

    @app.get("/dashboard/plotly.js", include_in_schema=False)
    async def plotly_js() -> FileResponse:
        return FileResponse(dashboard.PLOTLY_JS, media_type="application/javascript")

    @app.get("/dashboard/reports/{name}", include_in_schema=False, dependencies=[Depends(viewer)])
    async def report(name: str) -> FileResponse:
        # Checked before the file system sees it: a NUL byte or a 300-character name made Path raise (a 500).
        if not REPORT_NAME.fullmatch(name) or not (path := settings.home / "reports" / name).is_file():
            raise HTTPException(404, f"no report {name[:100]!r}")
        return FileResponse(path, media_type=REPORT_TYPES[path.suffix[1:]])

    return app
