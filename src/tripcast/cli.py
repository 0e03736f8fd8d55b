"""The ``tripcast`` command: parse, call, print. Errors a user can fix are one line, exit status 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from tripcast import interrupts
from tripcast.config import Settings, load_settings
from tripcast.errors import TripcastError

app = typer.Typer(help="Predict NYC taxi trip durations and keep the prediction good in production.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Download and inspect TLC monthly trip files.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: versions, champion / challenger, promotion, rollback.",
                         no_args_is_help=True)
experiment_app = typer.Typer(help="Online experiments: a challenger against the champion on live traffic.",
                              no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(experiment_app, name="experiment")
out = Console()
err = Console(stderr=True, soft_wrap=True)


def _settings(verbose: bool = False, dask: str | None = None) -> Settings:
    """Load settings and give Prefect its own quiet home under TRIPCAST_HOME (before Prefect is imported).
    ``dask`` (--dask) stands for TRIPCAST_DASK, so the flows, which load settings themselves, see it too."""
    if dask is not None:
        os.environ["TRIPCAST_DASK"] = dask
    settings = load_settings()
    if "TRIPCAST_HOME" not in os.environ and not settings.home.exists():  # the default is relative to where the
        # command runs: a second home must not appear unseen
        err.print(f"tripcast home: {settings.home.resolve()} (new; TRIPCAST_HOME sets another)", highlight=False)
    # Prefect's ephemeral server cannot create its SQLite file in a folder that does not exist yet.
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home.resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Quiet by default: a failing flow re-raises its error here, where it is printed as one line.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # httpx logs every request at INFO: `tripcast schedule` printed a line per poll of the Prefect server.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not verbose:
        # Prefect's background senders log under their class names, outside "prefect": after a failed flow
        # they said "Still processing items" under the one-line error.
        for name in ("prefect", "APILogWorker", "EventsWorker"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # urllib3 says "Retrying ..." before every failed call to an MLflow server, beside tripcast's own warning;
        # psycopg warns of a pipeline it ends after an error that MLflow handled (runs logging one dataset at once).
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
        logging.getLogger("psycopg").setLevel(logging.ERROR)
    return settings


def _ready_for_flows(settings: Settings) -> None:
    """For a command that runs flows on the registry, once its own arguments are checked: the registry must
    answer (one line within TRIPCAST_REGISTRY_WAIT_SECONDS otherwise, before any data is loaded), and Prefect's
    local database is made ready."""
    from tripcast.flows import report_progress_to, start_local_prefect
    from tripcast.tracking import require_registry

    require_registry(settings)
    say = (lambda message: err.print(message, highlight=False)) if settings.progress else lambda _: None
    report_progress_to(say)
    start_local_prefect(Path(os.environ["PREFECT_HOME"]), say)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


SERVICES = ("serve", "stream", "schedule")  # they stop gracefully on their own signal handlers


def main() -> None:
    if next((a for a in sys.argv[1:] if not a.startswith("-")), "") not in SERVICES:
        interrupts.install()
    try:
        try:
            app()
        finally:
            interrupts.check()  # one a library swallowed is still an interruption
    except TripcastError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except BaseException as exc:
        if isinstance(exc, SystemExit) or not interrupts.caused_by_signal(exc):
            raise
        # What was in hand has been undone on the way out (no half-written file, no undecided challenger,
        # child processes stopped).
        err.print("interrupted", highlight=False)
        sys.exit(130)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect and MLflow progress logs.")]
Color = Annotated[str, typer.Option(help="Taxi type: green, yellow, fhv, fhvhv (synth-<type>: tripcast data synth).")]
Dask = Annotated[str | None, typer.Option("--dask", help="Read months (and train, score) on a Dask cluster: local, "
                                                         "local:N workers, or a scheduler tcp://host:8786 "
                                                         "(TRIPCAST_DASK; '' in-process).")]


# --- data ----------------------------------------------------------------------------------------------
@data_app.command("pull")
def data_pull(
    color: Annotated[str, typer.Argument(help="green, yellow, fhv or fhvhv")],
    first: Annotated[str, typer.Argument(help="First month, YYYY-MM")],
    last: Annotated[str | None, typer.Argument(help="Last month, YYYY-MM (default: FIRST)")] = None,
) -> None:
    """Download months into the cache (skips those already there)."""
    from tripcast.data import tlc

    settings = _settings()
    tlc.check_color(color)
    for month in tlc.month_range(first, last or first):
        path = tlc.fetch(color, month, settings)
        out.print(f"{color} {month}: {tlc.validate_file(path, color):,} rows  {path}", highlight=False)


@data_app.command("drift")
def data_drift(
    color: Annotated[str, typer.Argument(help="green, yellow, fhv or fhvhv")],
    month: Annotated[str, typer.Argument(help="Month, YYYY-MM")],
    kind: Annotated[str, typer.Option(help="slower-traffic, longer-distances or zone-shift")],
    out_dir: Annotated[str, typer.Option("--out", help="Folder to write to (use it as TRIPCAST_TLC_MIRROR).")],
    strength: Annotated[float | None, typer.Option(help="Factor, or number of zones swapped.")] = None,
) -> None:
    """Write a month with a known drift, in the TLC's schema, to rehearse monitoring on purpose."""
    from pathlib import Path

    from tripcast.data.drift import inject

    path = inject(color, month, kind, _settings(), Path(out_dir), strength)
    out.print(f"{kind} {color} {month} -> {path}", highlight=False)


@data_app.command("synth")
def data_synth(
    like: Annotated[tuple[str, str], typer.Option(help="Colour and month whose rides are resampled, e.g. green "
                                                      "2021-01.")],
    rides: Annotated[str, typer.Option(help="How many rides: 2000000, 2M or 30M.")],
    out_dir: Annotated[str, typer.Option("--out", help="Folder to write to (use it as TRIPCAST_TLC_MIRROR).")],
    month: Annotated[str | None, typer.Option(help="Month written, YYYY-MM (default: the --like month).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
) -> None:
    """Write a synthetic month (real rides resampled with jitter) as synth-<colour>: for scale tests, not TLC data."""
    from tripcast.data import tlc
    from tripcast.data.synth import synthesize

    color, like_month = like
    tlc.check_color(color)
    count = _count(rides, "--rides")
    path = synthesize(color, tlc.Month.parse(like_month), count, Path(out_dir), _settings(),
                      tlc.Month.parse(month) if month else None, seed)
    out.print(f"{tlc.SYNTHETIC}{color} {month or like_month}: {count:,} rides resampled from {color} {like_month} "
              f"-> {path}", highlight=False)


def _count(text: str, option: str) -> int:
    """2000000, 2_000_000, 2M, 500k."""
    raw = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        _fail(f"{option} {text!r} is not a count (e.g. 2000000, 2M, 500k)")
    if not value.is_integer() or value < 1:
        _fail(f"{option} {text!r} must be a whole number of rides, at least 1")
    return int(value)


@data_app.command("info")
def data_info() -> None:
    """What the cache holds."""
    from tripcast.data import tlc

    settings = _settings()
    table = Table("colour", "month", "rows", "MB", title=f"cache: {settings.data_dir}")
    for item in tlc.cached_files(settings):
        table.add_row(item["color"], item["month"], f"{item['rows']:,}", f"{item['bytes'] / 1e6:.1f}")
    out.print(table if table.row_count else f"cache {settings.data_dir} is empty: tripcast data pull green 2021-01")


# --- training ------------------------------------------------------------------------------------------
@app.command()
def train(
    train_month: Annotated[str | None, typer.Option(help="Training month YYYY-MM (default: latest but one).")] = None,
    val_month: Annotated[str | None, typer.Option(help="Validation month YYYY-MM (default: latest).")] = None,
    model: Annotated[str, typer.Option(help="baseline, linear, ridge, lasso or lightgbm.")] = "lightgbm",
    color: Color = "green",
    trials: Annotated[int, typer.Option(help="Optuna trials (0: no tuning).", min=0)] = 0,
    timeout: Annotated[float | None, typer.Option(help="Tuning time budget in seconds.", min=1)] = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Register as challenger only.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    train_to: Annotated[str | None, typer.Option(help="Last training month YYYY-MM: train on --train-month to "
                                                       "this.")] = None,
    dask: Dask = None,
    verbose: Verbose = False,
) -> None:
    """Run the training flow: load, validate, features, train, evaluate, register."""
    from tripcast.models import FAMILIES

    if model not in FAMILIES:
        _fail(f"unknown model {model!r}: choose one of {', '.join(FAMILIES)}")
    if (trials or timeout) and model == "linear":
        _fail("model 'linear' has no hyper-parameters to tune; use ridge, lasso or lightgbm")
    from tripcast.data import tlc

    tlc.check_color(color)
    for month in (train_month, val_month, train_to):  # a malformed month in a moment, before the registry
        if month is not None:
            tlc.Month.parse(month)
    if train_to is not None:
        if train_month is None:
            _fail("--train-to needs --train-month")
        tlc.month_range(train_month, train_to)
    settings = _settings(verbose, dask)
    from tripcast.cluster import check_trainable

    check_trainable(settings, model, bool(trials or timeout))
    _ready_for_flows(settings)
    from tripcast.flows.train import train_flow

    result = train_flow(color, train_month, val_month, model, trials, timeout, promote=not no_promote,
                        train_to=train_to)
    if as_json:
        print(json.dumps(result))
        return
    _print_runs([result])


def _print_runs(runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    table = Table("model", "version", "val RMSE", "rule RMSE", "decision", "why",
                  title=f"{first['color']} {first['train_month']} -> {first['val_month']}")
    for run in runs:
        table.add_row(run["model"], run["version"], f"{run['metrics']['val_rmse']:.3f}",
                      f"{run['metrics']['baseline_val_rmse']:.3f}",
                      "[green]promoted[/green]" if run["promoted"] else "rejected", run["reason"])  # as `models list`
    out.print(table)


@app.command()
def evaluate(
    month: Annotated[str, typer.Option(help="Month to score, YYYY-MM.")],
    alias: Annotated[str, typer.Option(help="Alias or version number.")] = "champion",
    color: Color = "green",
    dask: Dask = None,
    verbose: Verbose = False,
) -> None:
    """Score a registered model on a month it has not seen."""
    from tripcast.data import tlc

    tlc.check_color(color)
    tlc.Month.parse(month)
    _ready_for_flows(_settings(verbose, dask))
    from tripcast.flows.train import evaluate_flow

    result = evaluate_flow(color, month, alias)
    out.print(f"version {result['version']} ({alias}) on {color} {month}: RMSE {result['rmse']:.3f}, "
              f"MAE {result['mae']:.3f}, R² {result['r2']:.3f} over {result['rows']:,} rides", highlight=False)


@app.command()
def score(
    month: Annotated[str, typer.Option(help="Month to score, YYYY-MM (first month of a backfill).")],
    to: Annotated[str | None, typer.Option(help="Last month of a backfill, YYYY-MM.")] = None,
    alias: Annotated[str, typer.Option(help="Alias or version number.")] = "champion",
    color: Color = "green",
    dask: Dask = None,
    verbose: Verbose = False,
) -> None:
    """Batch-score months with a registered model into predictions/<colour>/<YYYY-MM>.parquet."""
    from tripcast.data import tlc

    tlc.check_color(color)
    tlc.month_range(month, to or month)
    _ready_for_flows(_settings(verbose, dask))
    from tripcast.flows.score import score_flow

    result = score_flow(color, month, to, alias)
    for item in result["months"]:
        out.print(f"{color} {item['month']}: {item['rows']:,} rides scored by version {result['version']} "
                  f"({item['rows_per_second']:,} rows/s) -> {item['path']}", highlight=False)


@app.command()
def quickstart(verbose: Verbose = False) -> None:
    """The main job: green 2021-01..03; baseline, linear, LightGBM; promote the best; test on 2021-03."""
    settings = _settings(verbose)
    _ready_for_flows(settings)
    from tripcast.flows.train import quickstart_flow

    result = quickstart_flow()
    _print_runs(result["runs"])
    test = result["test"]
    out.print(f"champion (version {test['version']}) on green {test['month']}: RMSE {test['rmse']:.3f} "
              f"over {test['rows']:,} rides\n", highlight=False)
    uri = settings.resolved_tracking_uri
    tripcast, mlflow = _command("tripcast"), _command("mlflow")
    out.print("next:\n"
              f"  {mlflow} ui --backend-store-uri {uri}\n"
              f"  {tripcast} models list\n"
              f"  MLFLOW_TRACKING_URI={uri} {mlflow} models serve -m models:/{settings.model_name}@champion "
              "--env-manager local -p 5001\n"
              f"  {tripcast} loop --drift slower-traffic --drift-from 2021-02   # drift -> retrain -> experiment -> "
              "promote\n"
              f"  {tripcast} serve   # then http://127.0.0.1:8000/dashboard", highlight=False, soft_wrap=True)


def _command(name: str) -> str:
    """How to call one of this environment's commands from here: bare if it is on PATH (an activated venv),
    else by its path (after `make demo`, `.venv/bin/tripcast`)."""
    here = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and Path(found).resolve() == here.resolve():
        return name
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


@app.command()
def schedule(
    cron: Annotated[str, typer.Option(help="Cron schedule of the retrain.")] = "0 6 5 * *",
    monitor_cron: Annotated[str, typer.Option(help="Cron schedule of monitoring.")] = "15 * * * *",
    retention_cron: Annotated[str, typer.Option(help="Cron schedule of the prediction log's retention "
                                                     "(TRIPCAST_RETENTION_DAYS).")] = "30 3 * * *",
    model: Annotated[str, typer.Option(help="Model family.")] = "lightgbm",
    color: Color = "green",
    pool: Annotated[str | None, typer.Option(
        help="Register the deployments with this Prefect work pool (its workers run them) and return, instead "
             "of running them in this process.")] = None,
) -> None:
    """Prefect deployments: a monthly retrain on the latest TLC months, hourly monitoring (with the automation
    policy) and daily retention; served here, or run by a work pool's workers (--pool). Needs a Prefect server
    (PREFECT_API_URL)."""
    _settings(True)
    if not os.environ.get("PREFECT_API_URL"):
        _fail("a schedule needs a running Prefect server: `prefect server start`, then set PREFECT_API_URL "
              "(e.g. http://127.0.0.1:4200/api)")
    from prefect import serve as serve_deployments

    from tripcast.flows.monitor import monitor_deployment
    from tripcast.flows.retention import retention_deployment
    from tripcast.flows.train import deployment

    deployments = (deployment(cron, model, color), monitor_deployment(monitor_cron),
                   retention_deployment(retention_cron))
    if pool is None:
        serve_deployments(*deployments)
        return
    from prefect import deploy

    from tripcast.flows.recovery import ensure_crash_recovery

    # No image and no code storage: the pool's workers run tripcast as installed, by module path.
    deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    try:
        recovery = ensure_crash_recovery()
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"deployments {', '.join(d.name for d in deployments)} registered with work pool {pool!r}; "
               f"its workers run them (prefect worker start --pool {pool}); automations: {'; '.join(recovery)}")


@app.command()
def ui(
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.", min=1, max=65535)] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI.", min=1, max=65535)] = 4200,
    verbose: Verbose = False,
) -> None:
    """The MLflow UI (runs, versions, aliases, decisions) and the Prefect UI (flow runs and their logs) on the
    stores tripcast uses; a server already configured (an MLflow server, PREFECT_API_URL) is named instead of
    started. Ctrl-C stops them."""
    settings = _settings(verbose)
    uri = settings.resolved_tracking_uri
    wanted: dict[str, tuple[list[str], str]] = {}
    if not uri.startswith(("http://", "https://")):
        wanted["MLflow"] = ([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(mlflow_port)], f"http://127.0.0.1:{mlflow_port}")
    if not os.environ.get("PREFECT_API_URL"):
        from tripcast.flows import prepare_local_prefect

        prepare_local_prefect(settings.prefect_home)
        wanted["Prefect"] = ([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                              str(prefect_port)], f"http://127.0.0.1:{prefect_port}")
    for name, (_, url) in wanted.items():
        port = int(url.rsplit(":", 1)[1])
        try:
            with socket.create_server(("127.0.0.1", port)):
                pass
        except OSError as exc:
            _fail(f"cannot start the {name} UI on 127.0.0.1:{port}: {exc.strerror} (--{name.lower()}-port)")
    logs = settings.home / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    started = {name: subprocess.Popen(command, stdout=(logs / f"{name.lower()}.log").open("ab"),
                                      stderr=subprocess.STDOUT, preexec_fn=interrupts.owned_child)
               for name, (command, _) in wanted.items()}
    try:
        import httpx

        for name, (_, url) in wanted.items():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and started[name].poll() is None:
                with suppress(httpx.TransportError):
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                time.sleep(0.3)
            else:
                _fail(f"the {name} UI did not start: see {logs / (name.lower() + '.log')}")
        out.print(f"MLflow UI: {wanted['MLflow'][1] if 'MLflow' in wanted else uri}", highlight=False)
        prefect_ui = wanted["Prefect"][1] if "Prefect" in wanted else os.environ["PREFECT_API_URL"].removesuffix("/api")
        out.print(f"Prefect UI: {prefect_ui} (flow runs and their logs)\nCtrl-C stops them", highlight=False)
        while all(process.poll() is None for process in started.values()):
            time.sleep(0.5)
        _fail(f"a UI stopped: see {logs}")
    finally:  # each UI with the workers it started (its own process group)
        for process in started.values():
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in started.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            while time.monotonic() < deadline and _group_alive(process.pid):
                time.sleep(0.1)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# --- monitoring ----------------------------------------------------------------------------------------
@app.command()
def monitor(
    window: Annotated[str | None, typer.Option(help="day or week (default: TRIPCAST_WINDOW, week).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO date/time, New York time (default: 4 windows back).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date/time, exclusive (default: the last logged ride in a "
                                                   "window large enough to measure).")] = None,
    automate: Annotated[bool | None, typer.Option("--automate/--no-automate",
                                                  help="Let alerts retrain (default: TRIPCAST_AUTOMATE).")] = None,
    dask: Dask = None,
    verbose: Verbose = False,
) -> None:
    """Measure windows of logged predictions (drift, quality, accuracy), fire alerts, apply the policy."""
    settings = _settings(verbose, dask)
    from tripcast.monitoring.windows import window_of

    window_of(window or settings.window, datetime.now())  # an unknown window length fails here, in one line
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                _fail(f"--{name} {value!r} is not an ISO date or date-time (e.g. 2021-02-01)")
    _ready_for_flows(settings)
    from tripcast.flows.monitor import monitor_flow

    result = monitor_flow(window, since, until, automate)
    if not result["windows"]:
        out.print(result.get("note") or "nothing to monitor")
    elif result.get("note"):
        out.print(result["note"], highlight=False)
    table = Table("window", "version", "rides", "drift", "pred", "OD", "RMSE", "/val", box=box.SIMPLE_HEAD)
    for item in result["windows"]:
        for version, figures in sorted(item["figures"].items()):
            table.add_row(item["window"], f"v{version}", f"{figures.get('rows', 0):,.0f}",
                          *(_num(figures.get(m), d) for m, d in (("drift_share", 2), ("prediction_drift", 3),
                                                                  ("od_drift", 3), ("rmse", 2), ("rmse_ratio", 2))))
    if table.row_count:
        out.print(table)
    for message in result["alerts"]:
        out.print(f"[yellow]alert[/yellow] {message}", highlight=False)
    if result["decision"]:
        out.print(f"decision: {result['decision']['action']}: {result['decision']['reason']}", highlight=False)
    if result["experiment"]:
        look = result["experiment"]
        out.print(f"{look['kind']} {look['experiment_id']} ({look['mode']}, v{look['challenger_version']} vs "
                  f"v{look['champion_version']}): {look['decision']}: {look['reason']}", highlight=False,
                  soft_wrap=True)


@app.command()
def archive(
    now: Annotated[str | None, typer.Option(help="ISO date/time the retention period counts back from, New York "
                                                 "time (default: now).")] = None,
    verbose: Verbose = False,
) -> None:
    """Move logged predictions older than TRIPCAST_RETENTION_DAYS (by pickup) from the store to monthly parquet
    files under TRIPCAST_HOME/archive (what the scheduled retention flow does)."""
    settings = _settings(verbose)
    try:
        moment = datetime.fromisoformat(now) if now else None
    except ValueError:
        _fail(f"--now {now!r} is not an ISO date or date-time (e.g. 2021-06-01)")
    if settings.retention_days is None:
        _fail("TRIPCAST_RETENTION_DAYS is not set: without it the prediction log keeps every ride")
    from tripcast.flows import report_progress_to, start_local_prefect

    report_progress_to(lambda message: err.print(message, highlight=False))
    start_local_prefect(Path(os.environ["PREFECT_HOME"]), lambda _: None)
    from tripcast.flows.retention import retention_flow

    result = retention_flow(moment)
    out.print(f"{result['rows']:,} rides picked up before {result['cut'][:10]} archived in {len(result['files'])} "
              f"files under {settings.archive_dir}", highlight=False, soft_wrap=True)


@app.command()
def feedback(
    month: Annotated[str, typer.Option(help="The TLC month whose actual durations to join, YYYY-MM.")],
    color: Color = "green",
) -> None:
    """Join a published month's actual durations to the logged predictions (ride_id <colour>-<month>-<row>)."""
    settings = _settings()
    from tripcast.monitoring.feedback import join_month

    result = join_month(color, month, settings)
    out.print(f"{color} {month}: {result['stored']:,} labels stored, {result['matched']:,} match a logged "
              f"prediction, {result['unknown']:,} do not (yet)", highlight=False, soft_wrap=True)


@app.command()
def loop(
    first: Annotated[str, typer.Option("--from", help="First month replayed, YYYY-MM.")] = "2021-01",
    last: Annotated[str, typer.Option("--to", help="Last month replayed, YYYY-MM.")] = "2021-03",
    color: Color = "green",
    sample: Annotated[float, typer.Option(help="Share of each month's rides replayed.")] = 1.0,
    speedup: Annotated[float, typer.Option(help="Event time runs this many times faster than real time "
                                                "(0: as fast as the API answers).")] = 0.0,
    label_delay: Annotated[int, typer.Option(help="Windows until actual durations arrive.")] = 1,
    drift: Annotated[str | None, typer.Option(help="Inject a drift: slower-traffic, longer-distances or "
                                                   "zone-shift.")] = None,
    drift_from: Annotated[str | None, typer.Option(help="First drifted month (default: --from).")] = None,
    drift_strength: Annotated[float | None, typer.Option(help="Factor (or zones swapped).")] = None,
    api_url: Annotated[str | None, typer.Option(help="A running API (default: start one).")] = None,
    dask: Dask = None,
    verbose: Verbose = False,
) -> None:
    """Rehearse the loop: replay months as traffic, labels later, monitor, retrain, promote; print a timeline."""
    settings = _settings(verbose, dask)
    from tripcast.data import tlc

    tlc.check_color(color)  # before the rehearsal's imports (2 s): bad months are refused at once
    tlc.month_range(first, last)
    from tripcast.rehearsal import LoopOptions, check_options, run_loop, save_timeline, timeline_rows

    options = LoopOptions(color=color, first=first, last=last, sample=sample, speedup=speedup,
                          label_delay=label_delay, drift=drift, drift_from=drift_from, drift_strength=drift_strength,
                          api_url=api_url)
    check_options(options, settings)
    _ready_for_flows(settings)

    def progress(window, rides: int, outcome: dict) -> None:
        alerts = len(outcome["alerts"])
        note = f"; {alerts} alert{'s' * (alerts > 1)} about {', '.join(outcome['alerted'])}" if alerts else ""
        if outcome["decision"]:
            note += f"; {outcome['decision']['action']}"
        if outcome["experiment"]:
            look = outcome["experiment"]
            note += (f"; {look['kind']} v{look['challenger_version']} ({look['mode']}): {look['rides']:,} labelled "
                     f"rides, {look['decision']}")
        err.print(f"{window}: {rides:,} rides replayed{note}", highlight=False)

    result = run_loop(options, settings, progress if settings.progress else None,
                      (lambda message: err.print(message, highlight=False)) if settings.progress else lambda _: None)
    if result.bootstrap:
        out.print(result.bootstrap, highlight=False)
    table = Table(title=f"tripcast loop: {color} {first}..{last}" + (f", {drift} from {drift_from or first}"
                                                                     if drift else ""), box=box.SIMPLE_HEAD)
    for column in ("window", "rides", "served", "drift", "pred", "OD", "RMSE", "/val", "alerts", "experiment",
                   "decision"):
        table.add_column(column, justify="left" if column in ("window", "served", "experiment", "decision")
                         else "right", no_wrap=True)
    for row in timeline_rows(result):
        table.add_row(row["window"], f"{row['rides']:,}", row["served"], _num(row["drift_share"], 2),
                      _num(row["prediction_drift"]), _num(row["od_drift"]), _num(row["rmse"], 2),
                      _num(row["rmse_ratio"], 2), str(row["alerts"] or ""), row["experiment"], row["decisions"])
    Console(width=max(out.width, 140)).print(table)  # a table cut to 80 columns is unreadable in a log
    for d in result.timeline["decisions"]:
        out.print(f"{d['window']}: {d['action']}: {d['reason']}", highlight=False, soft_wrap=True)
    path = save_timeline(result, settings.home / "loop" / "timeline.csv")
    out.print(f"{result.sent:,} rides replayed, {result.failed:,} failed, {result.labels_sent:,} labels, "
              f"{result.seconds:.0f} s; timeline in {path}; dashboard: tripcast serve, then /dashboard",
              highlight=False, soft_wrap=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (use PostgreSQL stores with more than one).",
                                         min=1)] = 1,
    verbose: Verbose = False,
) -> None:
    """Serve predictions from the registry's champion (FastAPI on uvicorn); follows the alias as it moves."""
    _settings(verbose)
    import uvicorn

    try:  # before the models load and "serving" is printed; uvicorn would say so only after both
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts too
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:  # errno > 0: a bind error (its text without Python's suffix); else a bad host name
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
        _fail(f"cannot listen on {host}:{port}: {reason}")
    shared = None
    if workers > 1:
        # The workers share this folder: a reload asked of one (/admin/reload) reaches all of them, and each
        # counts what it serves in files here (prometheus_client's multiprocess mode), so that a scrape of
        # /metrics adds them all up, whichever worker answers it.
        shared = Path(tempfile.mkdtemp(prefix="tripcast-serve-"))
        os.environ["TRIPCAST_RELOAD_SIGNAL"] = str(shared / "reload")
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            (shared / "metrics").mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared / "metrics")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 host in brackets
    typer.echo(f"serving http://{address} ({workers} worker{'s' * (workers > 1)}; API docs at /docs); "
               "Ctrl-C stops it")
    try:
        uvicorn.run("tripcast.serving.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level="info" if verbose else "warning", access_log=verbose,
                    http="tripcast.serving.http:BoundedHttpToolsProtocol")  # header size and read timeouts
    finally:
        if shared:
            shutil.rmtree(shared, ignore_errors=True)


@app.command()
def stream(
    redis_url: Annotated[str, typer.Option(help="Redis server.")] = "redis://127.0.0.1:6379/0",
    input_stream: Annotated[str, typer.Option("--input", help="Stream of ride events (field 'ride': JSON).")]
    = "tripcast:rides",
    output_stream: Annotated[str, typer.Option("--output", help="Stream the predictions go to.")]
    = "tripcast:predictions",
    dead_letter: Annotated[str, typer.Option(help="Stream for malformed events.")] = "tripcast:dead-letter",
    group: Annotated[str, typer.Option(help="Consumer group.")] = "tripcast",
    max_len: Annotated[int, typer.Option(help="Entries kept in the output and dead-letter streams (about).",
                                         min=1)] = 1_000_000,
    verbose: Verbose = False,
) -> None:
    """Consume ride events from a Redis Stream and publish predictions (at-least-once)."""
    settings = _settings(verbose)
    from tripcast.streaming import StreamNames, run_consumer

    # SIGTERM (docker stop, Kubernetes) and Ctrl-C finish the batch in hand and flush the prediction log:
    # killed outright, the process lost the log rows of events it had already published and acknowledged.
    logging.getLogger("tripcast.streaming").setLevel(logging.INFO)  # a service says when it starts and stops
    stop = threading.Event()

    def request_stop(number: int, _frame: object) -> None:
        stop.set()
        signal.signal(number, signal.SIG_DFL)  # a second one ends it at once

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, request_stop)
    run_consumer(settings, redis_url, StreamNames(input_stream, output_stream, dead_letter, group), stop, max_len)


# --- registry ------------------------------------------------------------------------------------------
def _registry():
    from tripcast.registry import Registry
    from tripcast.tracking import require_registry

    settings = _settings()
    require_registry(settings)
    return Registry(settings)


@models_app.command("list")
def models_list() -> None:
    """Versions with their aliases, validation RMSE and the last decision."""
    from tripcast.registry import CHAMPION, rolled_back

    registry = _registry()
    aliases: dict[str, list[str]] = {}
    for alias, version in registry.aliases().items():
        aliases.setdefault(version, []).append(alias)
    champion = next((v for v, names in aliases.items() if CHAMPION in names), None)
    table = Table("version", "aliases", "model", "val RMSE", "rule", "decision", title=registry.name)
    for mv in registry.versions():
        run = registry.client.get_run(mv.run_id) if mv.run_id else None
        metrics = run.data.metrics if run else {}
        table.add_row(str(mv.version), ", ".join(aliases.get(str(mv.version), [])), mv.tags.get("model", ""),
                      f"{metrics.get('val_rmse', float('nan')):.3f}",
                      f"{metrics.get('baseline_val_rmse', float('nan')):.3f}",
                      mv.tags.get("promotion.decision", "") + (" (rolled back)" if rolled_back(mv, champion) else ""))
    out.print(table if table.row_count else f"no versions of {registry.name} yet: tripcast train")


@models_app.command("describe")
def models_describe(version: Annotated[str, typer.Argument(help="Version number or alias.")]) -> None:
    """Everything recorded about a version: run, metrics, decision and its reason."""
    registry = _registry()
    mv = registry.resolve(version)
    if mv is None:
        _fail(f"{registry.name} has no version or alias {version!r}")
    run = registry.client.get_run(mv.run_id)
    info = {"version": mv.version, "aliases": list(mv.aliases), "run_id": mv.run_id, "source": mv.source,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            "params": run.data.params,
            "metrics": {k: round(v, 4) for k, v in sorted(run.data.metrics.items())}, "tags": mv.tags}
    out.print_json(json.dumps(info, default=str))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version number.")],
    reason: Annotated[str, typer.Option(help="Recorded on the version.")] = "manual promotion",
) -> None:
    """Make VERSION the champion (an operator's override of the policy; recorded as such)."""
    mv = _registry().promote(version, reason)
    out.print(f"version {mv.version} is now champion", highlight=False)


@models_app.command("webhook")
def models_webhook(
    url: Annotated[str, typer.Argument(help="The API's reload endpoint, e.g. http://api:8000/admin/reload.")],
) -> None:
    """Have the MLflow server call the API when an alias moves (a webhook signed with TRIPCAST_ADMIN_TOKEN),
    so that a promotion is served at once rather than at the next poll."""
    settings = _settings()
    if not settings.admin_token:
        _fail("set TRIPCAST_ADMIN_TOKEN: the webhook is signed with it, and the API checks the signature")
    if not settings.resolved_tracking_uri.startswith(("http://", "https://")):
        _fail("webhooks are sent by an MLflow tracking server: set TRIPCAST_TRACKING_URI to one (the API polls "
              "an embedded registry every TRIPCAST_POLL_SECONDS)")
    from mlflow.exceptions import MlflowException

    from tripcast.serving.webhooks import subscribe

    try:
        webhook = subscribe(_registry().client, url, settings.admin_token)
    except MlflowException as exc:
        _fail(f"the registry refused the webhook: {exc.message}")
    out.print(f"webhook {webhook.name}: alias changes -> {webhook.url} (used once the MLflow server's "
              "webhook cache expires: MLFLOW_WEBHOOK_CACHE_TTL, 60 s by default)", highlight=False)


@models_app.command("rollback")
def models_rollback() -> None:
    """Move champion back to the previous champion."""
    previous, restored = _registry().rollback()
    out.print(f"champion rolled back from version {previous} to version {restored}", highlight=False)


# --- experiments ---------------------------------------------------------------------------------------
@experiment_app.command("start")
def experiment_start(
    version: Annotated[str, typer.Argument(help="The challenger: a registered version number.")],
    mode: Annotated[str, typer.Option(help="shadow (the challenger scores every ride, the champion answers) or ab "
                                           "(a share of rides is answered by the challenger).")] = "shadow",
    weight: Annotated[float, typer.Option(help="ab: the challenger's share of rides, between 0 and 1.")] = 0.1,
) -> None:
    """Start an experiment of VERSION against the champion; the API follows it (no restart), and each
    monitoring run looks at the evidence and promotes, rejects or continues."""
    if mode not in ("shadow", "ab"):
        _fail(f"mode {mode!r}: choose shadow or ab")
    if mode == "ab" and not 0 < weight < 1:
        _fail(f"weight {weight:g}: an A/B experiment needs a share of rides between 0 and 1 (exclusive)")
    from tripcast.monitoring import experiments

    registry, engine, now = _experiments_context()
    with registry.decision_lock():
        started = experiments.start(engine, registry, registry.settings, version, mode, weight,
                                    "started by hand (tripcast experiment start)", now)
    out.print(f"{experiments.describe(started)} started; the API follows it at its next poll "
              "(POST /admin/reload: at once)", highlight=False)


@experiment_app.command("status")
def experiment_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Experiments and guards, newest first: versions, mode, status, labelled rides, estimate and interval."""
    from tripcast.monitoring import experiments

    _, engine, _ = _experiments_context()
    found = experiments.status(engine)
    if as_json:
        print(json.dumps(found))
        return
    table = Table("id", "kind", "mode", "champion", "challenger", "status", "rides", "estimate", "interval",
                  title="experiments")
    for e in found:
        low, high = e["interval"]
        table.add_row(str(e["id"]), e["kind"], e["mode"] + (f" {e['weight']:.0%}" if e["weight"] else ""),
                      f"v{e['champion_version']}", f"v{e['challenger_version']}", e["status"],
                      f"{e['labelled_rides']:,}", "" if e["estimate"] is None else f"{e['estimate']:+.1%}",
                      "" if low is None or high is None else f"[{low:+.1%}, {high:+.1%}]")
    out.print(table if table.row_count else "no experiments yet")


@experiment_app.command("stop")
def experiment_stop(
    reason: Annotated[str, typer.Option(help="Recorded with the experiment.")] = "stopped by hand",
) -> None:
    """Stop the running experiment (or guard) without a decision: the API serves the champion alone again."""
    from tripcast.monitoring import experiments

    registry, engine, now = _experiments_context()
    with registry.decision_lock():
        stopped = experiments.stop(engine, registry, reason, now)
    out.print(f"{experiments.describe(stopped)} stopped", highlight=False)


def _experiments_context():
    """The registry, the monitoring store and the event time now (the newest pickup of the log's bulk)."""
    from tripcast.monitoring.windows import logged_span
    from tripcast.store import shared

    registry = _registry()
    engine = shared(registry.settings.resolved_monitoring_uri)
    span = logged_span(engine, registry.settings.window, registry.settings.min_window_rows)
    return registry, engine, span.bulk_last if span else datetime.now()
