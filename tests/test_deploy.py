"""The production profile's files, checked where they can be without Docker: the MLflow server as compose.yaml
configures it, started for real, answers the services that call it by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml
from conftest import eventually

from tripcast.rehearsal import free_port

COMPOSE = Path(__file__).parents[1] / "compose.yaml"


def test_the_compose_mlflow_server_answers_the_services_by_name(tmp_path: Path) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    mlflow_env = {k: str(v) for k, v in services["mlflow"].get("environment", {}).items()}
    published = services["mlflow"]["ports"][0].split(":")[0]
    callers = {urlsplit(services[name]["environment"]["TRIPCAST_TRACKING_URI"]).netloc
               for name in ("api", "automation", "stream")}
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env=os.environ | mlflow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    search = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/search"

    def status(host: str) -> int:
        return httpx.get(search, headers={"Host": host}, timeout=5).status_code

    try:
        eventually(lambda: status(f"127.0.0.1:{port}") == 200, 90, (httpx.TransportError,))
        # The services (by name) and a browser on the published port are let in...
        assert {host: status(host) for host in callers | {f"localhost:{published}"}} == dict.fromkeys(
            callers | {f"localhost:{published}"}, 200)
        # ...and the DNS-rebinding protection is still on for any other name.
        assert status("attacker.example:5000") == 403
    finally:
        server.terminate()
        server.wait(timeout=30)
