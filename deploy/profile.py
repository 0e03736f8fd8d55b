#!/usr/bin/env python3
"""The production profile as processes on one machine, kept up by supervisord: the MLflow server (PostgreSQL,
proxied artifacts, basic auth), the Prefect server (PostgreSQL, auth) with a process work pool and a worker
running the deployments, Redis with two stream consumers, two API replicas behind nginx (TLS), Prometheus
with tripcast's alert rules. compose.yaml describes the same services for Docker.

    python deploy/profile.py up      # start (or resume) it under .tripcast/production; prints where things are
    python deploy/profile.py status  # supervisord's view of each process
    python deploy/profile.py down    # stop every process (the databases and files stay)

Secrets come from the environment (TRIPCAST_ADMIN_TOKEN, TRIPCAST_VIEWER_TOKEN, MLFLOW_TRACKING_PASSWORD,
PREFECT_API_AUTH_STRING, MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY); any that is unset is generated once and kept in
<dir>/secrets.env (mode 600). Nothing here ships a default password.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
STANDARD_PORTS = {"nginx": 8443, "api-1": 8001, "api-2": 8002, "mlflow": 5000, "prefect": 4200,
                  "prometheus": 9090, "redis": 6380}
POOL = "tripcast"
AFTER_HEALTHY = ("prefect-worker",)  # started once the servers answer
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/"
MLFLOW_USER = "admin"
PREFECT_USER = "tripcast"
# Generated when the environment does not give them: (name, how).
SECRETS = {"TRIPCAST_ADMIN_TOKEN": lambda: secrets.token_urlsafe(32),
           "TRIPCAST_VIEWER_TOKEN": lambda: secrets.token_urlsafe(32),
           "MLFLOW_TRACKING_PASSWORD": lambda: secrets.token_urlsafe(24),
           "PREFECT_API_AUTH_STRING": lambda: f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": lambda: _fernet_key(),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": lambda: secrets.token_urlsafe(32)}  # the auth app's CSRF key


class ProfileError(Exception):
    """The profile cannot start, in one line."""


def _fernet_key() -> str:
    from cryptography.fernet import Fernet  # MLflow's own dependency

    return Fernet.generate_key().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(template: Path, values: dict[str, str]) -> str:
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m[1]], template.read_text())


def load_secrets(folder: Path) -> dict[str, str]:
    """The profile's secrets: the environment's, else those kept in <folder>/secrets.env, else new ones (kept)."""
    path = folder / "secrets.env"
    kept = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    values = {name: os.environ.get(name) or kept.get(name) or make() for name, make in SECRETS.items()}
    if values != kept:
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


class Profile:
    """One profile's folder: its settings (profile.json), secrets, rendered configuration, logs and data."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder.resolve()
        self.logs, self.run, self.home = self.dir / "logs", self.dir / "run", self.dir / "home"
        self.conf = self.dir / "supervisord.conf"

    @property
    def settings(self) -> dict:
        return json.loads((self.dir / "profile.json").read_text())

    def configure(self, postgres: str | None, prefix: str | None, free_ports: bool, fresh: bool,
                  tlc_mirror: str | None, retention_days: float = 90) -> dict:
        """Write profile.json, the secrets, the databases, the TLS certificate and every service's configuration."""
        for folder in (self.dir, self.logs, self.run, self.home, self.dir / "mlartifacts", self.dir / "redis",
                       self.dir / "prometheus", self.dir / "tls"):
            folder.mkdir(parents=True, exist_ok=True)
        previous = self.settings if (self.dir / "profile.json").exists() else {}
        # A profile resumed keeps its databases and server unless told otherwise.
        postgres = postgres or previous.get("postgres") or DEFAULT_POSTGRES
        prefix = prefix or previous.get("prefix") or "tripcast"
        ports = previous.get("ports") or {name: _free_port() if free_ports else port
                                          for name, port in STANDARD_PORTS.items()}
        databases = {name: f"{prefix}_{name}" for name in ("mlflow", "mlflow_auth", "prefect", "monitoring")}
        settings = {"ports": ports, "postgres": postgres, "prefix": prefix, "databases": databases, "pool": POOL,
                    "tlc_mirror": tlc_mirror, "retention_days": retention_days,
                    "urls": {"api": f"https://localhost:{ports['nginx']}", "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
                             "prefect": f"http://127.0.0.1:{ports['prefect']}/api",
                             "prometheus": f"http://127.0.0.1:{ports['prometheus']}",
                             "redis": f"redis://127.0.0.1:{ports['redis']}/0",
                             **{name: f"http://127.0.0.1:{ports[name]}" for name in ("api-1", "api-2")}},
                    "tls_cert": str(self.dir / "tls" / "cert.pem")}
        (self.dir / "profile.json").write_text(json.dumps(settings, indent=2))
        values = load_secrets(self.dir)
        _databases(postgres, databases.values(), fresh)
        self._certificate()
        self._write_configs(settings, values)
        return settings

    def _certificate(self) -> None:
        cert, key = self.dir / "tls" / "cert.pem", self.dir / "tls" / "key.pem"
        if cert.exists() and key.exists():
            return
        # Self-signed, for localhost: replace both files with a real certificate to expose the profile.
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        key.chmod(0o600)

    def _write_configs(self, settings: dict, values: dict[str, str]) -> None:
        ports = settings["ports"]
        (self.run / "viewer-token").write_text(values["TRIPCAST_VIEWER_TOKEN"])
        (self.run / "viewer-token").chmod(0o600)
        api = [f"127.0.0.1:{ports[name]}" for name in ("api-1", "api-2")]
        (self.run / "nginx.conf").write_text(nginx_conf(
            api, f"127.0.0.1:{ports['nginx']}", settings["tls_cert"], str(self.dir / "tls" / "key.pem"), self.run,
            str(self.logs / "nginx-access.log"), str(self.logs / "nginx-error.log"),
            root=os.geteuid() == 0))
        (self.run / "prometheus.yml").write_text(prometheus_conf(
            api, str(HERE / "prometheus" / "alerts.yml"), str(self.run / "viewer-token"), "5s"))
        (self.run / "mlflow-auth.ini").write_text(_render(HERE / "mlflow" / "basic_auth.ini", {
            "AUTH_DATABASE_URI": _sqlalchemy(settings["postgres"], settings["databases"]["mlflow_auth"])}))
        self.conf.write_text(self._supervisord())

    def environment(self, values: dict[str, str] | None = None) -> dict[str, str]:
        """What every tripcast process of the profile (and a user's command beside it) runs with."""
        settings, values = self.settings, values or load_secrets(self.dir)
        return {"TRIPCAST_HOME": str(self.home), "TRIPCAST_TRACKING_URI": settings["urls"]["mlflow"],
                "TRIPCAST_MONITORING_URI": _url(settings["postgres"], settings["databases"]["monitoring"]),
                "TRIPCAST_ADMIN_TOKEN": values["TRIPCAST_ADMIN_TOKEN"],
                "TRIPCAST_VIEWER_TOKEN": values["TRIPCAST_VIEWER_TOKEN"],
                "TRIPCAST_RETENTION_DAYS": f"{settings.get('retention_days', 90):g}",
                "MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": values["MLFLOW_TRACKING_PASSWORD"],
                "PREFECT_API_URL": settings["urls"]["prefect"],
                "PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"],
                "PREFECT_HOME": str(self.dir / "prefect-client"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # Flow runs' heartbeats: a run whose worker died is marked crashed after three missed, and re-run.
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                **({"TRIPCAST_TLC_MIRROR": settings["tlc_mirror"]} if settings.get("tlc_mirror") else {})}

    def programs(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """Each process of the profile: its command and what it adds to the environment."""
        s, tripcast = self.settings, str(BIN / "tripcast")
        ports = s["ports"]
        # What the tripcast processes run with, but the secrets: those reach them through supervisord's own
        # environment, so this file holds none.
        shared = {k: v.replace("%", "%%") for k, v in self.environment(dict.fromkeys(SECRETS, "")).items()
                  if k not in SECRETS}
        mlflow_db = _sqlalchemy(s["postgres"], s["databases"]["mlflow"])
        return {
            "redis": (["redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--appendonly", "yes",
                       "--dir", str(self.dir / "redis"), "--save", ""], {}),
            "mlflow": ([str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
                        str(ports["mlflow"]), "--workers", "2", "--backend-store-uri", mlflow_db,
                        "--artifacts-destination", str(self.dir / "mlartifacts"), "--serve-artifacts"],
                       {"MLFLOW_AUTH_CONFIG_PATH": str(self.run / "mlflow-auth.ini"),
                        "MLFLOW_AUTH_ADMIN_PASSWORD": "%(ENV_MLFLOW_TRACKING_PASSWORD)s",
                        "MLFLOW_SERVER_ALLOWED_HOSTS": f"localhost:*,127.0.0.1:{ports['mlflow']}",
                        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                        "MLFLOW_WEBHOOK_CACHE_TTL": "5"}),
            "prefect-server": ([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                str(ports["prefect"])],
                               {"PREFECT_HOME": str(self.dir / "prefect-server"),
                                "PREFECT_API_DATABASE_CONNECTION_URL":
                                    _url(s["postgres"], s["databases"]["prefect"], "postgresql+asyncpg"),
                                "PREFECT_SERVER_API_AUTH_STRING": "%(ENV_PREFECT_API_AUTH_STRING)s"}),
            "prefect-worker": ([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                "--name", "tripcast-worker"], shared),
            **{name: ([tripcast, "serve", "--host", "127.0.0.1", "--port", str(ports[name])], shared)
               for name in ("api-1", "api-2")},
            **{f"stream-{n}": ([tripcast, "stream", "--redis-url", s["urls"]["redis"]], shared) for n in (1, 2)},
            "nginx": (["nginx", "-p", str(self.run), "-c", str(self.run / "nginx.conf")], {}),
            "prometheus": (["prometheus", f"--config.file={self.run / 'prometheus.yml'}",
                            f"--storage.tsdb.path={self.dir / 'prometheus'}",
                            f"--web.listen-address=127.0.0.1:{ports['prometheus']}", "--web.enable-lifecycle"], {}),
        }

    def _supervisord(self) -> str:
        lines = ["[supervisord]", f"logfile={self.logs / 'supervisord.log'}", f"pidfile={self.run / 'supervisord.pid'}",
                 f"directory={self.dir}", "",
                 "[unix_http_server]", f"file={self.run / 'supervisor.sock'}", "chmod=0700", "",
                 "[supervisorctl]", f"serverurl=unix://{self.run / 'supervisor.sock'}", "",
                 "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", ""]
        for name, (command, env) in self.programs().items():
            environment = ",".join(f'{k}="{v}"' for k, v in env.items())
            lines += [f"[program:{name}]", "command=" + shlex.join(command).replace("%", "%%"),
                      # A worker started before its server never gets the server's event stream: `up` starts it.
                      f"autostart={'false' if name in AFTER_HEALTHY else 'true'}", "autorestart=true",
                      "startsecs=3", "startretries=20", "stopwaitsecs=30",
                      "stopasgroup=true", "killasgroup=true", "redirect_stderr=true",
                      f"stdout_logfile={self.logs / name}.log", "stdout_logfile_maxbytes=20MB",
                      *([f"environment={environment}"] if environment else []), ""]
        return "\n".join(lines)

    def up(self, wait: float = 180) -> None:
        values = load_secrets(self.dir)
        env = os.environ | self.environment(values) | values
        if not self.running():
            subprocess.run([str(BIN / "supervisord"), "-c", str(self.conf)], env=env, check=True)
        else:
            self.ctl("update")
        self.wait_healthy(wait)
        for name in AFTER_HEALTHY:
            self.ctl("start", name, check=False)  # already running: said, and fine
        # The work pool and the deployments its worker runs (idempotent: a second `up` updates them).
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                       env=env, check=True, capture_output=True)
        subprocess.run([str(BIN / "tripcast"), "schedule", "--pool", POOL], env=env, check=True,
                       capture_output=True)

    def wait_healthy(self, wait: float) -> None:
        urls = self.settings["urls"]
        checks = {"mlflow": f"{urls['mlflow']}/health", "prefect": f"{urls['prefect']}/health",
                  "api-1": f"{urls['api-1']}/health", "api-2": f"{urls['api-2']}/health",
                  "nginx": f"{urls['api']}/health", "prometheus": f"{urls['prometheus']}/-/ready"}
        deadline = time.monotonic() + wait
        waiting = dict(checks)
        with httpx.Client(verify=self.settings["tls_cert"], timeout=3) as client:
            while waiting and time.monotonic() < deadline:
                for name, url in list(waiting.items()):
                    try:
                        if client.get(url).status_code == 200:
                            del waiting[name]
                    except httpx.HTTPError:
                        pass
                time.sleep(0.5)
        if waiting:
            raise ProfileError(f"not healthy after {wait:g} s: {', '.join(waiting)} (see {self.logs}; "
                               "`python deploy/profile.py down` stops the rest)")

    def running(self) -> bool:
        return self.ctl("pid", check=False).returncode == 0

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args], capture_output=True,
                              text=True, check=check)

    def down(self, timeout: float = 90) -> None:
        if not self.running():
            return
        pid = int((self.run / "supervisord.pid").read_text())
        self.ctl("shutdown")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise ProfileError(f"supervisord ({pid}) still running after {timeout:g} s")


def nginx_conf(replicas: list[str], listen: str, cert: str, key: str, run: Path | str, access_log: str,
               error_log: str, root: bool = False) -> str:
    """nginx's configuration in front of ``replicas`` (host:port), TLS on ``listen``."""
    host, port = listen.rsplit(":", 1)
    return _render(HERE / "nginx" / "tripcast.conf", {
        "RUN": str(run), "ACCESS_LOG": access_log, "ERROR_LOG": error_log, "HOST": host, "PORT": port,
        "UPSTREAMS": "\n".join(f"        server {r} max_fails=1 fail_timeout=5s;" for r in replicas),
        "TLS_CERT": cert, "TLS_KEY": key,
        # As root, nginx's workers would run as nobody, who cannot write into the profile's folder.
        "USER": "user root;" if root else ""})


def prometheus_conf(replicas: list[str], rules: str, token_file: str, interval: str) -> str:
    return _render(HERE / "prometheus" / "prometheus.yml", {
        "SCRAPE_INTERVAL": interval, "RULES": rules, "VIEWER_TOKEN_FILE": token_file,
        "API_TARGETS": ", ".join(f'"{r}"' for r in replicas)})


def compose_configs() -> dict[Path, str]:
    """The files compose.yaml mounts, rendered from the same templates with the containers' names and paths."""
    replicas = ["api-1:8000", "api-2:8000"]
    return {HERE / "nginx" / "compose.conf": nginx_conf(
                replicas, "0.0.0.0:8443", "/etc/nginx/tls/cert.pem", "/etc/nginx/tls/key.pem", "/tmp",
                "/dev/stdout", "/dev/stderr"),
            HERE / "prometheus" / "compose.yml": prometheus_conf(
                replicas, "/etc/prometheus/alerts.yml", "/run/secrets/viewer_token", "15s")}


def _url(base: str, database: str, driver: str = "postgresql") -> str:
    parts = urlsplit(base)
    return f"{driver}://{parts.netloc}/{database}"


def _sqlalchemy(base: str, database: str) -> str:
    return _url(base, database, "postgresql+psycopg")


def _databases(postgres: str, names, fresh: bool) -> None:
    """Create the profile's databases on the PostgreSQL server (dropped first with ``fresh``)."""
    import psycopg

    try:
        with psycopg.connect(_url(postgres, "postgres"), autocommit=True, connect_timeout=5) as conn:
            for name in names:
                if fresh:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise ProfileError(f"cannot reach PostgreSQL at {urlsplit(postgres).hostname}: "
                           f"{str(exc).strip().splitlines()[-1]}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "env", "compose-configs"])
    parser.add_argument("--dir", type=Path, default=Path(".tripcast/production"), help="the profile's folder")
    parser.add_argument("--postgres", help=f"PostgreSQL server the profile's databases live on ({DEFAULT_POSTGRES})")
    parser.add_argument("--prefix", help="prefix of the profile's database names (tripcast)")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of the standard ones")
    parser.add_argument("--fresh", action="store_true", help="drop and recreate the profile's databases")
    parser.add_argument("--retention-days", type=float, default=90,
                        help="logged predictions older than this move to parquet (the retention deployment)")
    parser.add_argument("--tlc-mirror", default=os.environ.get("TRIPCAST_TLC_MIRROR"),
                        help="where the services read TLC months (default: TRIPCAST_TLC_MIRROR, else the TLC)")
    args = parser.parse_args(argv)
    profile = Profile(args.dir)
    missing = [tool for tool in ("nginx", "prometheus", "redis-server", "openssl") if not shutil.which(tool)]
    try:
        if args.action == "up":
            if missing:
                raise ProfileError(f"not installed: {', '.join(missing)} (apt-get install nginx prometheus "
                                   "redis-server openssl)")
            settings = profile.configure(args.postgres, args.prefix, args.free_ports, args.fresh, args.tlc_mirror,
                                         args.retention_days)
            print(f"starting the production profile in {profile.dir} ...", flush=True)
            profile.up()
            urls = settings["urls"]
            print(f"API {urls['api']} (TLS: {settings['tls_cert']}), MLflow {urls['mlflow']}, "
                  f"Prefect {urls['prefect'].removesuffix('/api')}, Prometheus {urls['prometheus']}\n"
                  f"secrets: {profile.dir / 'secrets.env'}; processes: python deploy/profile.py status; "
                  f"a shell for tripcast commands: eval \"$(python deploy/profile.py env)\"")
        elif args.action == "down":
            profile.down()
            print("stopped")
        elif args.action == "status":
            print(profile.ctl("status", check=False).stdout.rstrip() if profile.running() else "not running")
        elif args.action == "env":
            print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in profile.environment().items()))
        else:
            for path, text in compose_configs().items():
                path.write_text(text)
                print(f"wrote {path.relative_to(HERE.parent)}")
    except KeyboardInterrupt:
        print("interrupted; what started keeps running: python deploy/profile.py down stops it", file=sys.stderr)
        return 130
    except (ProfileError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None)
        print(f"profile: {exc}" + (f"\n{detail.strip()[-500:]}" if detail else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
