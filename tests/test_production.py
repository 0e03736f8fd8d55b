"""The production profile run whole, as real processes (deploy/profile.py under supervisord): two API replicas
behind nginx with TLS, the MLflow server with basic auth, the Prefect server with auth and a worker on a process
pool, Redis with two stream consumers, Prometheus with tripcast's alert rules, on the machine's PostgreSQL.
Faults are real: kill -9, a PostgreSQL restart, the MLflow server stopped."""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from conftest import POSTGRES, eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.production]

REPO = Path(__file__).parents[1]
PROFILE = REPO / "deploy" / "profile.py"
ZONES = [7, 41, 42, 74, 75, 82, 95, 97, 129, 166, 181, 244, 255, 260]


class Deployed:
    """A running profile: its folder, settings, secrets and environment."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.settings = json.loads((folder / "profile.json").read_text())
        self.urls = self.settings["urls"]
        self.cert = self.settings["tls_cert"]
        self.secrets = dict(line.split("=", 1) for line in (folder / "secrets.env").read_text().splitlines())
        env_lines = profile("env", folder).stdout.splitlines()
        self.env = {k.removeprefix("export "): v.strip("'") for k, v in (line.split("=", 1) for line in env_lines)}
        self.store = sa.create_engine(self.env["TRIPCAST_MONITORING_URI"].replace("postgresql://",
                                                                                  "postgresql+psycopg://"),
                                      pool_pre_ping=True)  # the PostgreSQL restart test drops its connections

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(Path(sys.executable).with_name("supervisorctl")), "-c",
                               str(self.dir / "supervisord.conf"), *args], capture_output=True, text=True).stdout

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program))

    def api(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.urls["api"], verify=self.cert, timeout=30, headers=headers)

    def tripcast(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPCAST_")} | self.env | extra
        return subprocess.run([sys.executable, "-m", "tripcast", *args], capture_output=True, text=True, env=env,
                              timeout=600)

    def logged(self, tag: str) -> collections.Counter:
        with self.store.connect() as conn:
            return collections.Counter(conn.execute(sa.text("SELECT ride_id FROM predictions WHERE ride_id LIKE :t"),
                                                    {"t": f"{tag}-%"}).scalars())

    def prometheus(self, query: str) -> list:
        answer = httpx.get(f"{self.urls['prometheus']}/api/v1/query", params={"query": query}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]


def profile(action: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIPCAST_HOME", "TRIPCAST_CONFIG"))}
    return subprocess.run([sys.executable, str(PROFILE), action, "--dir", str(folder), *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, tlc_mirror: Path) -> Iterator[Deployed]:
    """The whole profile, started once for the module by its one command, with a champion trained through it."""
    missing = [tool for tool in ("nginx", "prometheus", "redis-server") if not shutil.which(tool)]
    if missing:
        message = f"the production-profile tests need {', '.join(missing)} (apt-get install nginx prometheus)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    folder = tmp_path_factory.mktemp("production")
    prefix = f"tripcast_prod_{uuid.uuid4().hex[:8]}"
    started = profile("up", folder, "--free-ports", "--fresh", "--prefix", prefix, "--tlc-mirror", str(tlc_mirror))
    try:
        assert started.returncode == 0, started.stderr[-3000:] + _tail(folder / "logs")
        assert "API https://localhost:" in started.stdout and "Traceback" not in started.stdout + started.stderr
        env = Deployed(folder)
        trained = env.tripcast("train", "--train-month", "2021-01", "--val-month", "2021-02")
        assert trained.returncode == 0, trained.stderr[-2000:]
        with env.api() as api:
            # Until a replica serves a model its 503s mark it down in nginx a while: 502s, not JSON, meanwhile.
            eventually(lambda: {api.get("/ready").json()["version"] for _ in range(6)} == {"1"}, 90, (ValueError,))
        yield env
    finally:
        stopped = profile("down", folder)
        admin = sa.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in ("mlflow", "mlflow_auth", "prefect", "monitoring"):
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{prefix}_{name}" WITH (FORCE)'))
        admin.dispose()
        assert stopped.returncode == 0, stopped.stderr


def _tail(logs: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log")))


class Load:
    """Clients posting single rides through nginx, each with its own ride_id, until stopped: what was answered,
    and every failure (a status other than 200, or no answer)."""

    def __init__(self, deployed: Deployed, tag: str, clients: int = 4) -> None:
        self.deployed, self.tag = deployed, tag
        self.answered: list[str] = []
        self.failures: list[str] = []
        self.statuses: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        with self.deployed.api() as client:
            i = 0
            while not self._stop.is_set():
                ride_id = f"{self.tag}-{n}-{i}"
                ride = {"PULocationID": rng.choice(ZONES), "DOLocationID": rng.choice(ZONES),
                        "trip_distance": round(rng.uniform(0.3, 12), 2), "ride_id": ride_id}
                try:
                    response = client.post("/predict", json=ride)
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200 and response.json()["ride_id"] == ride_id:
                        self.answered.append(ride_id)
                    else:
                        self.failures.append(f"{ride_id}: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{ride_id}: {type(exc).__name__} {exc}")
                i += 1

    def all_logged(self) -> bool:
        logged = self.deployed.logged(self.tag)
        return not set(self.answered) - set(logged)


def test_one_command_starts_the_whole_profile_and_the_worker_runs_its_deployments(deployed: Deployed) -> None:
    status = deployed.ctl("status")
    programs = {"api-1", "api-2", "nginx", "mlflow", "prefect-server", "prefect-worker", "redis", "stream-1",
                "stream-2", "prometheus"}
    assert {line.split()[0]: line.split()[1] for line in status.splitlines()} == dict.fromkeys(programs, "RUNNING")

    # Through nginx with TLS, verified against the profile's certificate; both replicas answer in turn.
    with deployed.api() as api:
        answers = [api.post("/predict", json={"PULocationID": 74, "DOLocationID": 75, "trip_distance": 2.1})
                   for _ in range(20)]
        assert {r.status_code for r in answers} == {200} and len({r.json()["duration"] for r in answers}) == 1
        # Both answer in turn (once nginx has stopped skipping one that answered 503 while it loaded the model).
        both = {deployed.pid("api-1"), deployed.pid("api-2")}
        eventually(lambda: {api.get("/model").json()["worker"] for _ in range(10)} == both, 30)
    with pytest.raises(httpx.ConnectError):  # plain HTTP on the TLS port, or an unverified certificate
        httpx.get(deployed.urls["api"] + "/health", timeout=5)

    # Prometheus scrapes both replicas with the viewer token, and has loaded every rule.
    eventually(lambda: {r["metric"]["instance"]: r["value"][1] for r in deployed.prometheus('up{job="tripcast-api"}')}
               == {f"127.0.0.1:{deployed.settings['ports'][n]}": "1" for n in ("api-1", "api-2")}, 60)
    groups = httpx.get(f"{deployed.urls['prometheus']}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    written = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    assert {r["name"] for r in rules} == {r["alert"] for g in written for r in g["rules"]}
    eventually(lambda: all(r["health"] == "ok" for r in
                           (rule for g in httpx.get(f"{deployed.urls['prometheus']}/api/v1/rules", timeout=10)
                            .json()["data"]["groups"] for rule in g["rules"])), 30)
    for rule in rules:  # each expression is valid PromQL on tripcast's real series
        deployed.prometheus(rule["query"])
    # The series the rules read exist: the 20 rides above, counted by the replicas, scraped.
    eventually(lambda: float(deployed.prometheus("sum(tripcast_predictions_total)")[0]["value"][1]) >= 20, 30,
               (IndexError,))

    # The worker, not this process, runs a deployment: a retrain registers version 2 through MLflow's auth.
    run = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run", "train/monthly-retrain",
                          "-p", "train_month=2021-02", "-p", "val_month=2021-03", "--watch", "--watch-timeout", "400"],
                         capture_output=True, text=True, env=os.environ | deployed.env, timeout=450)
    worker_log = (deployed.dir / "logs" / "prefect-worker.log").read_text()
    assert "Completed" in run.stdout, run.stdout[-2000:] + worker_log[-3000:]
    assert "View run lightgbm green 2021-02->2021-03" in worker_log  # MLflow's line, from the worker's flow run
    described = deployed.tripcast("models", "describe", "2")
    assert described.returncode == 0, described.stderr


def test_every_service_refuses_who_has_no_credentials(deployed: Deployed) -> None:
    mlflow, prefect = deployed.urls["mlflow"], deployed.urls["prefect"]
    create = {"name": f"intruder-{uuid.uuid4().hex[:6]}"}
    assert httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/create", json=create, timeout=10).status_code == 401
    assert httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/search", timeout=10).status_code == 401
    wrong = httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/create", json=create, timeout=10,
                       auth=("admin", "not-the-password"))
    assert wrong.status_code == 401
    right = httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/search", timeout=10,
                      auth=("admin", deployed.secrets["MLFLOW_TRACKING_PASSWORD"]))
    assert right.status_code == 200
    assert httpx.post(f"{prefect}/flows/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{prefect}/flows/filter", json={}, timeout=10,
                      headers={"Authorization": "Basic " + base64.b64encode(
                          deployed.secrets["PREFECT_API_AUTH_STRING"].encode()).decode()}).status_code == 200

    viewer, admin = deployed.secrets["TRIPCAST_VIEWER_TOKEN"], deployed.secrets["TRIPCAST_ADMIN_TOKEN"]
    with deployed.api() as api:
        assert api.post("/admin/reload").status_code == 401
        assert api.post("/feedback", json={"labels": [{"ride_id": "x", "duration": 3}]}).status_code == 401
        assert api.post("/admin/reload", headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
        for path in ("/dashboard", "/dashboard/data", "/metrics"):
            refused = api.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic"), path
            assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert api.get(path, headers={"Authorization": f"Bearer {viewer}"}).status_code == 200, path
        assert api.get("/dashboard", auth=("anyone", viewer)).status_code == 200  # what a browser sends
        assert api.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        assert api.post("/admin/reload", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        assert api.post("/predict", json={"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1}).status_code == 200


def test_a_replica_killed_under_load_fails_no_request_and_loses_no_prediction(deployed: Deployed) -> None:
    killed = deployed.pid("api-1")
    with Load(deployed, f"kill-{uuid.uuid4().hex[:6]}") as load:
        time.sleep(4)
        before = len(load.answered)
        os.kill(killed, signal.SIGKILL)
        time.sleep(8)
    assert before > 100 and len(load.answered) > before + 100
    assert load.failures == [], load.failures[:5]
    # supervisord starts it again, and its journal is replayed (by it or by the other replica).
    eventually(lambda: deployed.ctl("status", "api-1").split()[1] == "RUNNING" and deployed.pid("api-1") != killed, 60)
    eventually(load.all_logged, 120)
    print(f"kill -9 under load: {len(load.answered)} answered, 0 failed, "
          f"{sum(deployed.logged(load.tag).values()) - len(load.answered)} logged twice (retried by nginx)")


def test_a_postgres_restart_under_load_answers_every_prediction_and_loses_none(deployed: Deployed) -> None:
    version = next(iter(Path("/etc/postgresql").iterdir())).name
    with Load(deployed, f"pg-{uuid.uuid4().hex[:6]}") as load:
        time.sleep(3)
        began = time.monotonic()
        restarted = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                                   capture_output=True, text=True, timeout=120)
        took = time.monotonic() - began
        time.sleep(5)
    assert restarted.returncode == 0, restarted.stderr
    assert load.failures == [] and set(load.statuses) == {200}, load.failures[:5]
    began = time.monotonic()
    eventually(load.all_logged, 120)
    print(f"PostgreSQL restarted under load ({took:.1f} s): {len(load.answered)} answered, 0 failed, all in the "
          f"store {time.monotonic() - began:.1f} s after the load")
    assert max(deployed.logged(load.tag).values()) == 1  # nothing retried: no replica died
    # Labels and metrics resume on the restarted server.
    with deployed.api(Authorization=f"Bearer {deployed.secrets['TRIPCAST_ADMIN_TOKEN']}") as api:
        stored = api.post("/feedback", json={"labels": [{"ride_id": load.answered[0], "duration": 9.5}]})
        assert stored.status_code == 200 and stored.json()["stored"] == 1
        eventually(lambda: "tripcast_log_store_up 1.0" in api.get("/metrics").text, 30)


def test_the_registry_stopped_for_30_s_fails_no_prediction_and_a_training_says_why(deployed: Deployed) -> None:
    versions = deployed.tripcast("models", "list").stdout
    deployed.ctl("stop", "mlflow")
    try:
        with Load(deployed, f"mlflow-{uuid.uuid4().hex[:6]}", clients=2) as load:
            started = time.monotonic()
            train = deployed.tripcast("train", "--train-month", "2021-01", "--val-month", "2021-02",
                                      TRIPCAST_REGISTRY_WAIT_SECONDS="5")
            # Prometheus tells a person: the replicas' polls of the registry fail.
            eventually(lambda: any(r["labels"]["alertname"] == "TripcastRegistryUnreachable" for r in httpx.get(
                f"{deployed.urls['prometheus']}/api/v1/alerts", timeout=10).json()["data"]["alerts"]), 40)
            time.sleep(max(0.0, 30 - (time.monotonic() - started)))
    finally:
        deployed.ctl("start", "mlflow")
    assert load.failures == [] and len(load.answered) > 1000, load.failures[:5]
    lines = [line for line in train.stderr.splitlines() if line.strip()]
    assert train.returncode == 2 and len(lines) == 1 and "the registry at http://127.0.0.1" in lines[0], train.stderr
    assert "Traceback" not in train.stderr
    eventually(load.all_logged, 120)
    print(f"MLflow stopped 30 s under load: {len(load.answered)} answered, 0 failed; training: {lines[0][:160]}")
    eventually(lambda: deployed.tripcast("models", "list").stdout == versions, 60)  # nothing half-registered


def test_retention_moves_old_rides_from_postgresql_to_parquet_and_labels_still_join(deployed: Deployed) -> None:
    tag = f"old-{uuid.uuid4().hex[:6]}"
    rides = [{"PULocationID": ZONES[i % len(ZONES)], "DOLocationID": ZONES[(i * 7) % len(ZONES)],
              "trip_distance": 1 + i % 9, "ride_id": f"{tag}-{i}",
              "pickup_datetime": f"2021-01-{5 + i % 20:02d}T08:00:00"}
             for i in range(300)]
    recent = {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 2.0, "ride_id": f"{tag}-recent",
              "pickup_datetime": "2021-03-01T08:00:00"}
    with deployed.api() as api:
        assert api.post("/predict/batch", json={"rides": [*rides, recent]}).status_code == 200
    eventually(lambda: sum(deployed.logged(tag).values()) == 301, 30)
    archived = deployed.tripcast("archive", "--now", "2021-03-10", TRIPCAST_RETENTION_DAYS="35",
                                 TRIPCAST_PROGRESS="false")
    assert archived.returncode == 0, archived.stderr
    assert archived.stdout.startswith("300 rides picked up before 2021-02-01 archived in 1 files"), archived.stdout
    assert set(deployed.logged(tag)) == {f"{tag}-recent"}  # gone from PostgreSQL ...
    files = list((deployed.dir / "home" / "archive").glob("predictions-2021-01-ids-*.parquet"))
    import pandas as pd

    kept = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(kept["ride_id"]) == sorted(r["ride_id"] for r in rides)  # ... and in parquet, once each
    with deployed.api(Authorization=f"Bearer {deployed.secrets['TRIPCAST_ADMIN_TOKEN']}") as api:
        labelled = api.post("/feedback", json={"labels": [{"ride_id": f"{tag}-recent", "duration": 8.0},
                                                          {"ride_id": f"{tag}-0", "duration": 8.0}]}).json()
    assert labelled["stored"] == 2 and labelled["unknown_ride_ids"] == [f"{tag}-0"]


def test_a_retrain_on_the_worker_a_manual_training_and_a_promotion_at_once_leave_a_consistent_registry(
        deployed: Deployed) -> None:
    from tripcast.config import Settings
    from tripcast.registry import CHAMPION, Registry

    os.environ.update({k: v for k, v in deployed.env.items() if k.startswith("MLFLOW_TRACKING_")})
    registry = Registry(Settings(home=deployed.dir / "home", tracking_uri=deployed.urls["mlflow"]))
    before = registry.history()
    other = next(v for v in ("1", "2") if v != registry.current(CHAMPION))
    env = os.environ | deployed.env
    retrain = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "deployment", "run",
                                "train/monthly-retrain", "-p", "train_month=2021-02", "-p", "val_month=2021-03",
                                "--watch", "--watch-timeout", "500"], env=env, stdout=subprocess.PIPE, text=True)
    manual = subprocess.Popen([sys.executable, "-m", "tripcast", "train", "--train-month", "2021-03", "--val-month",
                               "2021-02", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(5)  # both are loading data when the operator promotes
    promoted = deployed.tripcast("models", "promote", other, "--reason", "operator, during two trainings")
    assert promoted.returncode == 0, promoted.stderr
    assert "Completed" in retrain.communicate(timeout=600)[0]
    out, err = manual.communicate(timeout=600)
    assert manual.returncode == 0 and "Traceback" not in err, err[-2000:]

    # Each promotion is recorded on top of the champion before it (a version's tag names the champion it
    # replaced when it last became champion): the decisions were taken one at a time under the registry's
    # lock, whatever order they met it in. The operator's version is among them; the alias ends on the last.
    history = registry.history()
    assert history[:len(before)] == before and other in history[len(before):]
    assert registry.current(CHAMPION) == history[-1]
    for version in set(history):
        last = len(history) - 1 - history[::-1].index(version)
        assert registry.version(version).tags.get("promotion.previous_champion") == (
            history[last - 1] if last else None), (version, history)
    versions = registry.versions()
    assert [str(v.version) for v in versions] == ["1", "2", "3", "4"]  # one version per training, none twice
    assert all(v.tags.get("promotion.decision") in ("promoted", "rejected") for v in versions[2:])
    print(f"retrain on the worker + manual train + promote at once: champion history {' -> '.join(history)}")


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def test_a_worker_killed_during_a_retrain_its_run_crashes_and_is_re_run_without_a_second_version(
        deployed: Deployed) -> None:
    from tripcast.config import Settings
    from tripcast.registry import FLOW_RUN_TAG, Registry

    prefect = httpx.Client(base_url=deployed.urls["prefect"], timeout=10,
                           auth=tuple(deployed.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)))
    started = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run",
                              "train/monthly-retrain", "-p", "train_month=2021-03", "-p", "val_month=2021-02",
                              "-p", "trials=6"],  # tuned: long enough to be killed in the middle
                             capture_output=True, text=True, env=os.environ | deployed.env, timeout=60)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)[1]

    def state() -> dict:
        return prefect.get(f"/flow_runs/{run_id}").json()

    eventually(lambda: state()["state_type"] == "RUNNING", 120)
    worker = deployed.pid("prefect-worker")
    eventually(lambda: _descendants(worker), 30)  # the flow run's own process
    time.sleep(4)  # loading months and tuning; its first heartbeat sent
    doomed = [worker, *_descendants(worker)]
    assert state()["state_type"] == "RUNNING"
    for pid in doomed:  # the machine dies: the worker and its runs at once
        os.kill(pid, signal.SIGKILL)

    # No heartbeat for three intervals: Prefect marks it Crashed and schedules it again; the restarted worker
    # runs it to the end.
    eventually(lambda: state()["state_type"] == "COMPLETED", 420)
    history = [s["name"] for s in prefect.get("/flow_run_states/", params={"flow_run_id": run_id}).json()]
    assert "Crashed" in history and history[-1] == "Completed" and state()["run_count"] == 2, history
    assert deployed.pid("prefect-worker") != worker

    os.environ.update({k: v for k, v in deployed.env.items() if k.startswith("MLFLOW_TRACKING_")})
    registry = Registry(Settings(home=deployed.dir / "home", tracking_uri=deployed.urls["mlflow"]))
    mine = [v for v in registry.versions() if v.tags.get(FLOW_RUN_TAG, "").startswith(f"{run_id}/")]
    assert len(mine) == 1 and mine[0].tags["promotion.decision"] in ("promoted", "rejected")
    print(f"worker killed during a retrain: states {' -> '.join(history)}; one version ({mine[0].version})")


def test_the_grafana_provisioning_runs_against_the_real_stores(deployed: Deployed) -> None:
    grafana = REPO / "deploy" / "grafana"
    sources = yaml.safe_load((grafana / "provisioning" / "datasources" / "tripcast.yml").read_text())["datasources"]
    uids = {source["uid"]: source for source in sources}
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    assert uids["tripcast-prometheus"]["url"] == "http://prometheus:9090" and "prometheus" in compose
    assert uids["tripcast-monitoring"]["jsonData"]["database"] == "monitoring"
    assert compose["grafana"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    boards = {p.stem: json.loads(p.read_text()) for p in (grafana / "dashboards").glob("*.json")}
    generated = subprocess.run([sys.executable, str(grafana / "dashboards.py")], capture_output=True, text=True)
    assert generated.returncode == 0 and boards == {p.stem: json.loads(p.read_text())
                                                   for p in (grafana / "dashboards").glob("*.json")}
    assert set(boards) == {"tripcast-service", "tripcast-model"}

    # A real monitoring run fills the store's windows (the load tests above logged tens of thousands of rides).
    monitored = deployed.tripcast("monitor", "--no-automate", TRIPCAST_PROGRESS="false")
    assert monitored.returncode == 0, monitored.stderr
    now = time.time()
    since = {"now-6h": now - 6 * 3600, "now-30d": now - 30 * 86400}
    rows = {}
    with deployed.store.connect() as conn:
        for board in boards.values():
            start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since[board["time"]["from"]]))
            end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600))
            for panel in board["panels"]:
                assert panel["datasource"]["uid"] in uids, panel["title"]
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] == panel["datasource"]["uid"]
                    if "rawSql" in target:  # Grafana's macro, as its PostgreSQL datasource expands it
                        query = re.sub(r"\$__timeFilter\(([\w.]+)\)", rf"\1 BETWEEN '{start}' AND '{end}'",
                                       target["rawSql"])
                        assert "$" not in query
                        rows[panel["title"]] = conn.execute(sa.text(query)).all()
                    else:
                        rows[panel["title"]] = deployed.prometheus(target["expr"].replace("$__rate_interval", "1m"))
    # What the runs above made is on the panels: traffic, drift, latency, the versions served.
    for title in ("Rides logged per hour by version and arm", "Drift per window (share of features, zone pairs, "
                  "predictions)", "Requests per second by path and status", "Latency of /predict (p50, p99)",
                  "Rides predicted per second by version and arm", "Replicas up, store up, version served",
                  "Labelled share of logged rides per day"):
        assert rows[title], title
    logged = {row[1]: row[2] for row in rows["Rides logged per hour by version and arm"]}
    assert any(metric.endswith(" champion") for metric in logged)


def test_no_secret_appears_in_any_log_or_answer(deployed: Deployed) -> None:
    # Last in the module: the logs of every process through everything above.
    secrets = {name: value for name, value in deployed.secrets.items()}
    secrets["PREFECT_API_AUTH_STRING password"] = deployed.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)[1]
    admin = {"Authorization": f"Bearer {deployed.secrets['TRIPCAST_ADMIN_TOKEN']}"}
    with deployed.api(**admin) as api:
        answers = {path: api.get(path).text for path in ("/ready", "/model", "/health", "/dashboard/data", "/metrics",
                                                         "/openapi.json")}
    mlflow = httpx.Client(auth=("admin", deployed.secrets["MLFLOW_TRACKING_PASSWORD"]), timeout=10)
    runs = mlflow.post(f"{deployed.urls['mlflow']}/api/2.0/mlflow/runs/search",
                       json={"experiment_ids": [e["experiment_id"] for e in mlflow.get(
                           f"{deployed.urls['mlflow']}/api/2.0/mlflow/experiments/search",
                           params={"max_results": 100}).json()["experiments"]]}).text
    versions = mlflow.get(f"{deployed.urls['mlflow']}/api/2.0/mlflow/model-versions/search").text
    texts = answers | {"mlflow runs": runs, "mlflow versions": versions} | {
        f"log {p.name}": p.read_text(errors="replace") for p in (deployed.dir / "logs").glob("*.log")}
    assert len([name for name in texts if name.startswith("log ")]) >= 10
    leaks = [(secret, where) for secret, value in secrets.items() for where, text in texts.items() if value in text]
    assert leaks == []
