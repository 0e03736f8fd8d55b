"""The command line as a user runs it: real processes, real exit codes, no tracebacks for bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import eventually

from tripcast.config import Settings

TRIPCAST = [sys.executable, "-m", "tripcast"]


def run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(TRIPCAST + args, capture_output=True, text=True, env=user_environment(env_extra), cwd=cwd,
                          timeout=timeout)


def user_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """As a user runs tripcast: without the logging levels the test harness sets for itself."""
    return {k: v for k, v in os.environ.items() if not k.endswith("_LOGGING_LEVEL")} | (extra or {})


def test_help_lists_the_commands() -> None:
    result = run(["--help"])
    assert result.returncode == 0
    for command in ("data", "train", "evaluate", "quickstart", "models", "schedule"):
        assert command in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["data", "pull", "purple", "2021-01"], "unknown colour 'purple'"),
    (["data", "pull", "green", "2021-13"], "malformed month '2021-13'"),
    (["data", "pull", "green", "2021-05"], "no green file for 2021-05"),
    (["train", "--model", "xgb", "--train-month", "2021-01", "--val-month", "2021-02"], "unknown model 'xgb'"),
    (["models", "rollback"], "no previous champion"),
    (["models", "describe", "7"], "no version 7"),
    (["monitor", "--window", "month"], "window 'month': choose day or week"),
    (["monitor", "--since", "yesterday"], "--since 'yesterday' is not an ISO date"),
    (["feedback", "--month", "2021-05"], "no green file for 2021-05"),
    (["loop", "--sample", "2"], "sample must be in (0, 1]"),
    (["loop", "--api-url", "http://127.0.0.1:9"], "set TRIPCAST_ADMIN_TOKEN"),
    (["data", "drift", "green", "2021-02", "--kind", "bogus", "--out", "drifted"], "unknown drift 'bogus'"),
    (["serve", "--port", "70000"], "Invalid value for '--port'"),  # uvicorn started on it without a word
    (["stream", "--redis-url", "localhost:6379"], "Redis URL 'localhost:6379': Redis URL must specify"),
    (["models", "webhook", "http://127.0.0.1:8000/admin/reload"], "set TRIPCAST_ADMIN_TOKEN"),
    (["serve", "--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid:8000: "),
])
def test_bad_input_is_one_clear_line(settings: Settings, args: list[str], message: str) -> None:
    result = run(args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["data", "pull", "green", "2021-13"], ["train", "--train-month", "2021-13", "--val-month", "2021-02"],
    ["evaluate", "--month", "2021-13"], ["score", "--month", "2021-13"], ["feedback", "--month", "2021-13"],
    ["loop", "--from", "2021-13"], ["data", "drift", "green", "2021-13", "--kind", "zone-shift", "--out", "x"]])
def test_a_malformed_month_is_refused_at_once_by_every_command(settings: Settings, args: list[str]) -> None:
    started = time.monotonic()
    result = run(args)
    took = time.monotonic() - started  # no data loaded, no flow run recorded: ~0.5 s, where it took ~10 s
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: malformed month '2021-13': expected YYYY-MM, e.g. 2021-01"), result.stderr
    assert took < 2, took


def test_serve_on_a_port_in_use_says_so_before_loading_anything(settings: Settings) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run(["serve", "--port", str(port)])
    assert result.returncode == 2 and "serving" not in result.stdout
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_a_webhook_needs_a_tracking_server(settings: Settings) -> None:
    result = run(["models", "webhook", "http://127.0.0.1:8000/admin/reload"], {"TRIPCAST_ADMIN_TOKEN": "t"})
    assert result.returncode == 2 and "webhooks are sent by an MLflow tracking server" in result.stderr


def test_an_error_in_a_flow_on_the_ephemeral_prefect_server_is_one_line(settings: Settings) -> None:
    # Without PREFECT_API_URL, Prefect's background senders said "Still processing items" under the error.
    result = run(["score", "--month", "2021-03", "--to", "2021-01"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: empty month range: 2021-03 is after 2021-01"


def test_offline_error_names_the_mirror_setting(settings: Settings) -> None:
    env = {"TRIPCAST_TLC_MIRROR": "", "TRIPCAST_TLC_BASE_URL": "http://127.0.0.1:9/trip-data",
           "TRIPCAST_DOWNLOAD_RETRIES": "2", "TRIPCAST_DOWNLOAD_BACKOFF_SECONDS": "0.1"}
    result = run(["data", "pull", "green", "2021-01"], env)
    assert result.returncode == 2 and "TRIPCAST_TLC_MIRROR" in result.stderr and "Traceback" not in result.stderr
    # Each retry is said as it starts, not after the last one fails.
    assert "download of green_tripdata_2021-01.parquet failed (ConnectionError); attempt 2 of 2 in 0 s" \
        in result.stderr


def test_pull_a_range_then_info(settings: Settings) -> None:
    pulled = run(["data", "pull", "green", "2021-01", "2021-03"])
    assert pulled.returncode == 0, pulled.stderr
    assert "green 2021-01: 76,518 rows" in pulled.stdout and "green 2021-03: 83,827 rows" in pulled.stdout
    info = run(["data", "info"], {"COLUMNS": "120"})
    assert info.returncode == 0 and "64,572" in info.stdout and "2021-02" in info.stdout


@pytest.mark.slow
def test_train_json_then_models_list(settings: Settings, prefect_server: str) -> None:
    env = {"PREFECT_API_URL": prefect_server}
    result = run(["train", "--train-month", "2021-01", "--val-month", "2021-02", "--model", "linear", "--json"], env)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["version"] == "1" and payload["alias"] is None and not payload["promoted"]  # rejected
    assert payload["metrics"]["val_rmse"] == pytest.approx(7.7587, abs=0.02)
    assert payload["metrics"]["baseline_val_rmse"] < payload["metrics"]["val_rmse"]  # the rule wins here
    listing = run(["models", "list"], {"COLUMNS": "120"})
    assert listing.returncode == 0 and "linear" in listing.stdout and "rejected" in listing.stdout
    described = json.loads(run(["models", "describe", "1"]).stdout)
    assert described["created"].startswith(time.strftime("%Y-", time.gmtime()))  # a date, not epoch milliseconds


@pytest.mark.slow
def test_an_error_inside_the_flow_is_still_one_line(settings: Settings, prefect_server: str) -> None:
    result = run(["train", "--train-month", "2021-05", "--val-month", "2021-06"], {"PREFECT_API_URL": prefect_server})
    assert result.returncode == 2
    assert "no green file for 2021-05" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_schedule_serves_its_deployments_without_a_line_per_poll(settings: Settings, prefect_server: str,
                                                                  tmp_path: Path) -> None:
    output = tmp_path / "schedule.log"
    env = user_environment({"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    with output.open("w") as sink:
        schedule = subprocess.Popen(TRIPCAST + ["schedule"], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        eventually(lambda: "being served" in output.read_text(), 60)
        time.sleep(4)  # four polls of the Prefect server
    finally:
        schedule.terminate()
        schedule.wait(timeout=30)
    text = output.read_text()
    assert "monitor/monitor" in text and "train/monthly-retrain" in text
    assert "HTTP Request" not in text and "Traceback" not in text


def _interrupt_when(args: list[str], ready, settings: Settings, signal_number: int = 2) -> tuple[float, str, int]:
    """Start ``tripcast args`` in a session of its own, as a terminal would; once ``ready(what it said so far)``
    holds, signal its whole process group (Ctrl-C reaches every process of the foreground group); return the
    seconds it took to exit, its stderr and its exit status. Afterwards no process of its group may be left."""
    env = user_environment({"TRIPCAST_PROGRESS": "true"})
    said = settings.home.parent / f"stderr-{time.monotonic_ns()}.txt"
    with said.open("w") as sink:
        process = subprocess.Popen(TRIPCAST + args, stdout=subprocess.DEVNULL, stderr=sink, env=env,
                                   start_new_session=True)
    try:
        eventually(lambda: ready(said.read_text()), timeout=180)
        children = _descendants(process.pid)  # its API, Prefect's server: in sessions of their own
        sent = time.monotonic()
        os.killpg(process.pid, signal_number)
        process.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    stderr = said.read_text()
    time.sleep(0.5)
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    left += subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert children and not left, f"processes left behind: {left}"
    return took, stderr, process.returncode


def _descendants(pid: int) -> list[int]:
    found = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return found + [grandchild for child in found for grandchild in _descendants(child)]


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [2, 15])  # Ctrl-C, SIGTERM
def test_an_interrupted_quickstart_stops_at_once_and_leaves_no_undecided_challenger(settings: Settings,
                                                                                    signal_number: int) -> None:
    from tripcast.registry import CHALLENGER, Registry

    # Ready once the first version is judged: the next is being trained, inside Prefect's calls. (Read from
    # what the command says: polling MLflow's SQLite store from here made its commits wait for locks.)
    took, stderr, status = _interrupt_when(["quickstart"], lambda said: "baseline: version" in said, settings,
                                           signal_number)
    # SIGTERM during a flow run is Prefect's first: it reports the crashed run before the command stops.
    assert took < (5 if signal_number == 2 else 8) and status == 130, (took, status, stderr)
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr
    assert "ERROR" not in stderr, stderr
    registry = Registry(settings)
    assert registry.current(CHALLENGER) is None  # no version left undecided behind the alias
    assert all(v.tags.get("promotion.decision") in ("rejected", "promoted", "interrupted")
               for v in registry.versions())


@pytest.mark.slow
def test_an_interrupted_loop_stops_its_api_and_says_one_line(settings: Settings) -> None:
    log = settings.home / "loop" / "timeline.csv"
    took, stderr, status = _interrupt_when(
        ["loop", "--from", "2021-01", "--to", "2021-02", "--sample", "0.3"],
        lambda said: said.count("rides replayed") >= 2, settings)
    assert took < 5 and status == 130, (took, status, stderr)
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr
    assert not log.exists()  # nothing written as if the rehearsal had ended


@pytest.mark.slow
def test_quickstart_gives_the_readme_figures(settings: Settings) -> None:
    # The main job as `make demo` runs it (no Prefect server set: tripcast starts Prefect's local one).
    result = run(["quickstart"], {"COLUMNS": "140"})
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:6]]
            for line in result.stdout.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()}
    assert rows == {"baseline": ["1", "7.366", "7.366", "rejected"], "linear": ["2", "7.759", "7.366", "rejected"],
                    "lightgbm": ["3", "5.417", "7.366", "promoted"]}
    assert "champion (version 3) on green 2021-03: RMSE 5.317 over 80,372 rides" in result.stdout
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "RMSE 5.317 over 80,372 rides" in readme and "│ lightgbm │ 3       │ 5.417" in readme
    # The hints name the commands as this environment calls them.
    hint = next(line.split()[0] for line in result.stdout.splitlines() if line.strip().endswith("models list"))
    assert hint == "tripcast" or Path(hint).resolve() == (Path(sys.executable).parent / "tripcast").resolve(), hint


@pytest.mark.slow
def test_ui_shows_mlflow_and_prefect_on_tripcasts_stores_and_ctrl_c_stops_them(settings: Settings) -> None:
    import httpx

    trained = run(["train", "--train-month", "2021-01", "--val-month", "2021-02", "--model", "baseline"])
    assert trained.returncode == 0, trained.stderr
    mlflow_port, prefect_port = _free_port(), _free_port()

    def both_answer(_said: str) -> bool:
        try:
            return _both_answer()
        except httpx.TransportError:  # not up yet
            return False

    def _both_answer() -> bool:
        models = httpx.get(f"http://127.0.0.1:{mlflow_port}/ajax-api/2.0/mlflow/registered-models/search", timeout=5)
        runs = httpx.post(f"http://127.0.0.1:{prefect_port}/api/flow_runs/filter", json={}, timeout=5)
        return models.status_code == 200 and runs.status_code == 200 and bool(runs.json()) and \
            models.json()["registered_models"][0]["name"] == settings.model_name

    took, stderr, status = _interrupt_when(["ui", "--mlflow-port", str(mlflow_port), "--prefect-port",
                                            str(prefect_port)], both_answer, settings)
    assert took < 12 and status == 130 and stderr.strip().splitlines()[-1] == "interrupted", (took, stderr)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{mlflow_port}/", timeout=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
