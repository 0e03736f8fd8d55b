"""The production profile as compose.yaml describes it, checked where it can be without Docker: its MLflow
server (PostgreSQL backend, artifacts served by the server), started for real with compose.yaml's settings."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import mlflow
import pytest
import yaml
from conftest import eventually
from test_cli import run

from tripcast import training
from tripcast.config import Settings
from tripcast.registry import CHAMPION, Registry
from tripcast.rehearsal import free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SERVICES = yaml.safe_load((Path(__file__).parents[1] / "compose.yaml").read_text())["services"]
TOKEN = "deploy-test-token"


# The secrets compose.yaml refuses to start without, as a user would set them.
SECRETS = {"POSTGRES_PASSWORD": "a-password", "TRIPCAST_ADMIN_TOKEN": TOKEN, "TRIPCAST_VIEWER_TOKEN": "viewer",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-password", "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key",
           "PREFECT_API_AUTH_STRING": "tripcast:prefect-password", "GRAFANA_ADMIN_PASSWORD": "grafana-password",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "XmHZ0ACU5U2vULQt4OoT-Yzd4sOG6kebzq8LSh8GgTQ="}


def compose_env(service: str, given: dict[str, str] = SECRETS) -> dict[str, str]:
    """A service's environment as compose gives it: ``${NAME:-default}`` is NAME's value or the default;
    ``${NAME:?message}`` is NAME's value, and without one compose refuses to start (KeyError here)."""
    def value(m: re.Match) -> str:
        if m[2] == ":?" and m[1] not in given:
            raise KeyError(f"{m[1]}: {m[3]}")
        return given.get(m[1], m[3])

    return {k: re.sub(r"\$\{(\w+)(:[-?])([^}]*)\}", value, str(v))
            for k, v in SERVICES[service].get("environment", {}).items()}


def test_compose_refuses_to_start_without_its_secrets() -> None:
    """No default password, token or key to forget in production: each is ``${NAME:?message}``."""
    text = (Path(__file__).parents[1] / "compose.yaml").read_text()
    uses = re.findall(r"\$\{(\w+)(:[-?])([^}]*)\}", text)
    secrets = {name for name, _, _ in uses if re.search("PASSWORD|TOKEN|KEY|AUTH_STRING", name)}
    assert secrets == set(SECRETS)
    assert all(kind == ":?" and message.startswith(f"set {name}") for name, kind, message in uses if name in secrets)
    assert "tripcast:tripcast@" not in text and "change-me" not in text
    with pytest.raises(KeyError, match="TRIPCAST_ADMIN_TOKEN: set TRIPCAST_ADMIN_TOKEN"):
        compose_env("api-1", {k: v for k, v in SECRETS.items() if k != "TRIPCAST_ADMIN_TOKEN"})
    assert compose_env("api-1")["TRIPCAST_MONITORING_URI"] == "postgresql://tripcast:a-password@postgres:5432/monitoring"


def _profile_module():
    spec = importlib.util.spec_from_file_location("profile", Path(__file__).parents[1] / "deploy" / "profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_and_the_process_profile_run_the_same_services_with_the_same_settings(tmp_path: Path) -> None:
    profile = _profile_module()
    deployed = profile.Profile(tmp_path)
    (tmp_path / "profile.json").write_text(json.dumps({  # as `configure` writes it, without starting anything
        "ports": profile.STANDARD_PORTS, "postgres": profile.DEFAULT_POSTGRES, "prefix": "tripcast",
        "databases": {n: f"tripcast_{n}" for n in ("mlflow", "mlflow_auth", "prefect", "monitoring")},
        "tlc_mirror": None, "urls": {"mlflow": "http://mlflow", "prefect": "http://prefect/api", "redis": "redis://r"}}))
    programs = deployed.programs()
    # The same processes: compose adds the PostgreSQL server (the profile uses the machine's), a one-shot
    # service that registers the deployments (the profile's `up` does it) and Grafana (not installable here:
    # tests/test_production.py runs its dashboards' queries against the profile's stores).
    assert set(SERVICES) - {"postgres", "deployments", "grafana"} == {"prefect" if p == "prefect-server" else p
                                                          for p in programs}

    def words(service: str) -> list[str]:
        command = SERVICES[service]["command"]
        return command if isinstance(command, list) else command.split()

    for name in ("api-1", "api-2", "stream-1", "stream-2", "prefect-worker"):
        started = [Path(programs[name][0][0]).name, *programs[name][0][1:]]
        assert words(name)[:2] == started[:2], name
        flags = {w for w in started if w.startswith("--")}
        assert flags - {"--host", "--port"} <= set(words(name)), name
    assert "--app-name basic-auth" in SERVICES["mlflow"]["command"] and "--app-name" in programs["mlflow"][0]
    assert words("deployments")[:4] == ["tripcast", "schedule", "--pool", profile.POOL]
    # The same environment for every tripcast process (but the paths of one host), the same secrets.
    local = {"TRIPCAST_HOME", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "TRIPCAST_TLC_MIRROR"}
    assert set(compose_env("api-1")) == set(deployed.environment(dict.fromkeys(profile.SECRETS, "x"))) - local
    assert compose_env("api-1") == compose_env("prefect-worker") == compose_env("stream-1")
    assert set(SECRETS) == set(profile.SECRETS) | {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    # nginx, Prometheus and MLflow's auth: compose mounts what the profile's templates render for containers.
    for path, text in profile.compose_configs().items():
        assert path.read_text() == text, f"{path.name} is stale: python deploy/profile.py compose-configs"
    mounted = {v.split(":")[0] for service in SERVICES.values() for v in service.get("volumes", [])}
    assert {"./deploy/nginx/compose.conf", "./deploy/prometheus/compose.yml", "./deploy/prometheus/alerts.yml",
            "./deploy/mlflow/basic_auth.ini"} <= mounted


def test_the_services_share_what_they_write_for_each_other_and_keep_their_spools() -> None:
    # The automation service writes the Evidently reports that the API's /dashboard links to: in containers
    # of their own, each under its own home, every link was a 404. And a spool (predictions waiting for the
    # monitoring store) in a container's own layer is lost when the container is recreated.
    dockerfile = (Path(__file__).parents[1] / "Dockerfile").read_text()
    home = re.search(r"TRIPCAST_HOME=(\S+)", dockerfile)[1]

    def mounts(service: str) -> dict[str, str]:  # path in the container -> named volume
        return {path: volume for volume, path in (v.split(":")[:2] for v in SERVICES[service].get("volumes", []))}

    assert mounts("api-1")[f"{home}/reports"] == mounts("prefect-worker")[f"{home}/reports"]
    assert mounts("api-1") == mounts("api-2")  # the replicas share their spool: each replays the other's journal
    assert f"{home}/spool" in mounts("api-1") and f"{home}/spool" in mounts("stream-1")
    assert f"{home}/predictions" in mounts("api-1")  # `docker compose run --rm api-1 tripcast score` keeps it
    # The image makes every mounted folder as its non-root user, so a new volume takes that user's ownership.
    made = re.search(r"^RUN mkdir -p (.+)$", dockerfile, re.MULTILINE)
    assert dockerfile.index("USER tripcast") < made.start()
    folders = {f.strip('"').replace("$TRIPCAST_HOME", home) for f in made[1].split()}
    assert {path for service in SERVICES if service in ("api-1", "prefect-worker", "stream-1")
            for path in mounts(service)} <= folders


@pytest.fixture(scope="module")
def compose_mlflow(postgres_database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """compose.yaml's MLflow server on a free port: its environment, a fresh PostgreSQL backend and an
    artifact folder of its own. Yields its URL and that folder."""
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    backend = postgres_database().replace("postgresql://", "postgresql+psycopg://")
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
         "--serve-artifacts"],
        env=os.environ | compose_env("mlflow"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120, (httpx.TransportError,))
        yield url, artifacts
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_mlflow_server_answers_the_services_by_name(compose_mlflow: tuple[str, Path]) -> None:
    url, _ = compose_mlflow
    callers = {urlsplit(SERVICES[name]["environment"]["TRIPCAST_TRACKING_URI"]).netloc
               for name in ("api-1", "prefect-worker", "stream-1")}
    browser = f"localhost:{SERVICES['mlflow']['ports'][0].split(':')[0]}"  # the published port

    def status(host: str) -> int:
        return httpx.get(f"{url}/api/2.0/mlflow/registered-models/search", headers={"Host": host},
                         timeout=5).status_code

    assert {host: status(host) for host in callers | {browser}} == dict.fromkeys(callers | {browser}, 200)
    assert status("attacker.example:5000") == 403  # the DNS-rebinding protection is still on


def tripcast(args: list[str], url: str) -> subprocess.CompletedProcess:
    return run(args, {"TRIPCAST_TRACKING_URI": url, "TRIPCAST_ADMIN_TOKEN": TOKEN})


def test_training_through_the_server_keeps_the_model_on_the_server(compose_mlflow: tuple[str, Path],
                                                                   settings: Settings) -> None:
    url, artifacts = compose_mlflow
    result = tripcast(["train", "--train-month", "2021-01", "--val-month", "2021-02"], url)
    assert result.returncode == 0, result.stderr[-2000:]

    # The model, its plots and its monitoring reference are in the server's artifact folder; nothing of
    # MLflow's is left on the machine that trained (a `docker compose run --rm` container).
    assert {p.name for p in artifacts.rglob("*") if p.is_dir()} >= {"plots", "reference"}
    assert any(artifacts.rglob("lightgbm.txt"))
    assert not settings.mlflow_dir.exists()

    # The champion, read back through the server, scores the validation month as training measured it.
    registry = Registry(settings.with_overrides(tracking_uri=url))
    version, pipeline = registry.load_pipeline(CHAMPION)
    logged = registry.client.get_run(version.run_id).data.metrics["val_rmse"]
    measured = training.evaluate(pipeline, training.read_month_data("green", "2021-02", settings))["rmse"]
    assert measured == pytest.approx(logged, rel=1e-9)
    mlflow.set_tracking_uri(None)


def test_a_promotion_reaches_the_api_through_the_registry_webhook(compose_mlflow: tuple[str, Path],
                                                                  settings: Settings) -> None:
    # The API polls once an hour here: only the webhook can make it follow within seconds.
    url, _ = compose_mlflow
    registry = Registry(settings.with_overrides(tracking_uri=url))
    if registry.current(CHAMPION) is None:  # this test alone: train the champion here
        assert tripcast(["train", "--train-month", "2021-01", "--val-month", "2021-02"], url).returncode == 0
    first = registry.by_alias(CHAMPION)
    second = registry.register(first.source, first.run_id)
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "tripcast", "serve", "--port", str(port), "--workers", "2"],
                           env=os.environ | {"TRIPCAST_TRACKING_URI": url, "TRIPCAST_ADMIN_TOKEN": TOKEN,
                                             "TRIPCAST_POLL_SECONDS": "3600"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api_url = f"http://127.0.0.1:{port}"

    def served() -> set[str]:
        return {httpx.get(f"{api_url}/model", timeout=5).json()["champion"]["serving"]["version"] for _ in range(10)}

    try:
        eventually(lambda: httpx.get(f"{api_url}/ready", timeout=1).status_code == 200, 90, (httpx.TransportError,))
        subscribed = tripcast(["models", "webhook", f"{api_url}/admin/reload"], url)
        assert subscribed.returncode == 0 and "webhook tripcast-reload" in subscribed.stdout, subscribed.stderr
        assert served() == {first.version}
        time.sleep(float(compose_env("mlflow")["MLFLOW_WEBHOOK_CACHE_TTL"]) + 1)  # the server sees the webhook
        registry.promote(second.version, reason="webhook test")
        eventually(lambda: served() == {second.version}, 10)  # both workers
    finally:
        api.terminate()
        api.wait(timeout=30)
    mlflow.set_tracking_uri(None)
