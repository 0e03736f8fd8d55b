"""Benchmark: the same registered champion served by tripcast and by the servers an ML engineer would pick
instead, one worker each, driven by wrk on loopback.

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/serve.py [--seconds 10] [--rounds 3] [--against REF]
                                                                [--no-peers]

Servers: tripcast with everything on (the prediction log on SQLite, Prometheus metrics, an A/B traffic policy
with a 10 % challenger), tripcast with ``TRIPCAST_LOG_FSYNC=always``, `mlflow models serve`, Seldon MLServer
1.7 (mlserver-mlflow on the registered model with ``parallel_workers`` 0 and its default 1, and a custom runtime
calling the pipeline's single-row path: the strongest MLServer), BentoML 1.4 (a service around the same
pipeline), a bare FastAPI + LightGBM endpoint (the model alone) and a hello-world endpoint on tripcast's stack
(the ceiling). With ``--against REF``, also tripcast as of a git commit (its ``src`` from ``git archive``, in
this environment). MLServer and BentoML run from their own virtual environments (``bench/peers.py``, made once
in ~/.cache/tripcast-bench); one that cannot be installed is reported and left out.

All run at once and are measured in interleaved rounds (medians of ``--rounds``): single rides at concurrency
16 (and 4 for tripcast and the ceiling), then 10,000-ride batches (wrk, one connection) in each server's batch
form: tripcast's rows, columns, Open Inference Protocol (V2) and Arrow; MLServer's V2; BentoML's lists. For
tripcast, what the prediction log made of them (every ride logged, or dropped and counted). Also the per-ride
cost of the registered model through ``mlflow.pyfunc`` for 1, 10 and 10,000 rides.

Targets: single rides >= 1.3x the best peer's req/s at c16 and the lowest p99; >= 60 % of the ceiling at c16,
p99 at c4 within 2x the ceiling's; 10,000-ride batches (columnar or V2) >= 1.5x MLServer's rides/s with every
ride logged, row-oriented batches no slower than before. Ends with one JSON line (ratios
``tripcast_vs_<server>`` for single rides, ``batch_tripcast_vs_<server>_<form>`` for batches). Needs wrk
(Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import peers

from tripcast.rehearsal import free_port
from tripcast.serving.columnar import to_arrow

HERE = Path(__file__).resolve().parent
TRIPCASTS = ("tripcast", "tripcast-always", "tripcast-ref")  # tripcast servers, each with its own store
RIDE_LUA = """
local counter = 0
local zones = {{10, 50, 4.2}, {74, 75, 1.1}, {130, 205, 3.7}, {42, 41, 0.9}}
request = function()
  counter = counter + 1
  local z = zones[(counter % 4) + 1]
  local body = @BODY@
  return wrk.format("POST", "@PATH@", {["Content-Type"] = "application/json"}, body)
end
"""
DONE_LUA = """
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format('RESULT {"rps": %.1f, "p50_ms": %.3f, "p99_ms": %.3f, "errors": %d, "requests": %d}\\n',
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    errors, summary.requests))
end
"""
BATCH_LUA = """
local f = io.open("@BODY@", "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = "@TYPE@"
"""
TRIPCAST_BODY = ('string.format(\'{"PULocationID": %d, "DOLocationID": %d, "trip_distance": %.1f, '
                 '"ride_id": "r%d"}\', z[1], z[2], z[3], counter)')
MLFLOW_BODY = ('string.format(\'{"dataframe_records": [{"PULocationID": %d, "DOLocationID": %d, '
               '"trip_distance": %.1f}]}\', z[1], z[2], z[3])')


def start(cmd: list[str], env: dict, probe: str, timeout: float = 180,
          exit_on_failure: bool = True) -> subprocess.Popen | None:
    process = subprocess.Popen(cmd, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd=tempfile.gettempdir())
    deadline = time.monotonic() + timeout
    said = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            said = process.stderr.read().decode()[-2000:]
            break
        time.sleep(0.3)
    else:
        process.kill()
        said = "did not come up in time"
    if exit_on_failure:
        sys.exit(f"{' '.join(cmd)}: {said}")
    print(f"{cmd[0]}: {said}", flush=True)
    return None


def wrk(url: str, path: str, body: str, connections: int, seconds: int, folder: Path) -> dict:
    script = folder / f"wrk-{abs(hash((url, body)))}.lua"
    script.write_text(RIDE_LUA.replace("@BODY@", body).replace("@PATH@", path) + DONE_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def prepare(home: Path) -> dict:
    """Train the default LightGBM once, register it as champion, and once more as challenger."""
    os.environ.update({"TRIPCAST_HOME": str(home), "TRIPCAST_PROGRESS": "false"})
    from tripcast import training
    from tripcast.config import load_settings
    from tripcast.registry import CHALLENGER, Registry

    def mlflow_artifacts(uri: str) -> str:
        import mlflow

        return mlflow.artifacts.download_artifacts(uri, dst_path=str(home / "bare-model"))

    settings = load_settings()
    months = [training.read_month_data("green", m, settings)
              for m in ("2021-01", "2021-02")]
    result = training.train(months[0], months[1], "lightgbm", settings)
    registry = Registry(settings)
    champion = registry.register(result.model_uri, result.run_id)
    registry.promote(champion.version, reason="benchmark")
    challenger = registry.register(result.model_uri, result.run_id)
    registry.client.set_registered_model_alias(registry.name, CHALLENGER, challenger.version)
    model_dir = Path(mlflow_artifacts(f"models:/{settings.model_name}/{champion.version}")) / "artifacts" / "pipeline"
    return {"tracking_uri": settings.resolved_tracking_uri, "model": settings.model_name, "model_dir": str(model_dir),
            "model_uri": str(model_dir.parent.parent)}


def log_state(url: str) -> dict:
    """The prediction log's counters; a server before the journal had a spool instead (``spooled``)."""
    state = httpx.get(f"{url}/model", timeout=10).json()["prediction_log"]
    return state | {"settled": not state["queued"] and (state["replayed"] >= state["spooled"] if "spooled" in state
                                                        else not state["journal_backlog_bytes"])}


def batch_rate(url: str, path: str, body: Path, content_type: str, seconds: int, folder: Path, tripcast: bool,
               rides: int = 10_000) -> dict:
    """A batch endpoint under wrk: one connection posting the same 10,000 rides back to back; for tripcast,
    also what the prediction log made of them (written, or dropped and counted)."""
    before = log_state(url) if tripcast else None
    script = folder / f"batch-{abs(hash((url, path, str(body))))}.lua"
    script.write_text(BATCH_LUA.replace("@BODY@", str(body)).replace("@TYPE@", content_type) + DONE_LUA)
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", str(script), f"{url}{path}"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    result["rides_per_s"] = round(result["rps"] * rides)
    if before is None:
        return result
    started = time.perf_counter()
    drained(url)
    after = log_state(url)
    return result | {"logged": after["written"] - before["written"], "dropped": after["dropped"] - before["dropped"],
                     "read_back": after["replayed"] - before["replayed"],
                     "catch_up_s": round(time.perf_counter() - started, 1)}


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the runs (errors: their sum; stalled: runs the server answered nothing in,
    which wrk counts as neither a request nor an error)."""
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "errors"}
    return medians | {"errors": sum(r["errors"] for r in runs), "stalled": sum(not r["requests"] for r in runs)}


def drained(url: str, timeout: float = 300) -> None:
    """Wait until tripcast's prediction log has written what the last run left it (it would load the next run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_state(url)["settled"]:
            return
        time.sleep(0.2)


V2_TYPES = {"PULocationID": "INT32", "DOLocationID": "INT32", "trip_distance": "FP64", "ride_id": "BYTES"}
V2_BODY = ('string.format(\'{"inputs": [{"name": "PULocationID", "datatype": "INT32", "shape": [1], "data": [%d]}, '
           '{"name": "DOLocationID", "datatype": "INT32", "shape": [1], "data": [%d]}, '
           '{"name": "trip_distance", "datatype": "FP64", "shape": [1], "data": [%.1f]}]}\', z[1], z[2], z[3])')
BENTO_BODY = ('string.format(\'{"PULocationID": %d, "DOLocationID": %d, "trip_distance": %.1f}\', '
              'z[1], z[2], z[3])')
ARROW = "application/vnd.apache.arrow.stream"


@dataclass
class Target:
    """A server under test: how to start it and probe it, its single-ride request (None: batches only) and
    its batch forms (name -> (path, body file, content type))."""

    cmd: list[str]
    probe: str
    single: tuple[str, str] | None
    batches: dict[str, tuple[str, Path, str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    tripcast: bool = False
    low_concurrency: bool = False  # also measured at c4 (the p99 target against the ceiling)
    port: int | None = None  # fixed when the server reads it from a file; else "{port}" in ``cmd``


def batch_bodies(folder: Path, rides: int = 10_000) -> dict[str, tuple[Path, str]]:
    """The same 10,000 rides in each server's batch form: rows, columns, V2 tensors, Arrow, BentoML's lists."""
    columns = {"PULocationID": [1 + i % 265 for i in range(rides)],
               "DOLocationID": [1 + (i * 7) % 265 for i in range(rides)],
               "trip_distance": [0.5 + i % 20 for i in range(rides)], "ride_id": [f"b{i}" for i in range(rides)]}
    numbers = {k: v for k, v in columns.items() if k != "ride_id"}
    forms = {
        "rows": json.dumps({"rides": [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(),
                                                                                                strict=True)]}),
        "columns": json.dumps({"columns": columns}),
        "v2": json.dumps({"inputs": [{"name": k, "datatype": V2_TYPES[k], "shape": [rides], "data": v}
                                     for k, v in columns.items()]}),
        # The peers get no ride ids (they would not use them).
        "v2-peer": json.dumps({"inputs": [{"name": k, "datatype": V2_TYPES[k], "shape": [rides], "data": v}
                                          for k, v in numbers.items()]}),
        "bentoml": json.dumps(numbers),
        "arrow": to_arrow(columns),
    }
    bodies = {}
    for name, body in forms.items():
        path = folder / f"batch-{name}.body"
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        bodies[name] = (path, ARROW if name == "arrow" else "application/json")
    return bodies


def _per_ride(call, rides: int) -> float:
    """Microseconds a ride, over ~20,000 rides."""
    repeat = max(1, 20_000 // rides)
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat / rides * 1e6


def pyfunc_cost(model_uri: str, model_dir: str) -> dict:
    """Per-ride cost through ``mlflow.pyfunc`` (what MLflow-compatible servers call) for 1, 10 and 10,000
    rides, beside the pipeline's vectorised path on the same frames (the pyfunc before the single-row path)."""
    import mlflow.pyfunc
    import pandas as pd

    from tripcast.models import TripDurationPipeline

    model = mlflow.pyfunc.load_model(model_uri)
    pipeline = TripDurationPipeline.load(Path(model_dir))
    figures = {}
    for n in (1, 10, 10_000):
        frame = pd.DataFrame({"PULocationID": [1 + i % 265 for i in range(n)],
                              "DOLocationID": [1 + (i * 7) % 265 for i in range(n)],
                              "trip_distance": [0.5 + i % 20 for i in range(n)]})
        pyfunc = min(_per_ride(lambda f=frame: model.predict(f), n) for _ in range(3))
        vectorised = min(_per_ride(lambda f=frame: pipeline.predict_features(pipeline.preprocessor.transform(f)), n)
                         for _ in range(3))
        figures[str(n)] = {"pyfunc_us_per_ride": round(pyfunc, 2), "vectorised_us_per_ride": round(vectorised, 2)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and concurrency (medians reported)")
    parser.add_argument("--against", metavar="REF", help="also serve tripcast as of this git commit")
    parser.add_argument("--no-peers", action="store_true", help="leave out MLServer and BentoML")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/serve.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("training and registering the champion ...", flush=True)
        info = prepare(folder / "home")
        pyfunc = pyfunc_cost(info["model_uri"], info["model_dir"])
        for n, cost in pyfunc.items():
            print(f"mlflow.pyfunc, {n:>6s} ride(s) a call: {cost['pyfunc_us_per_ride']:8.2f} us a ride "
                  f"(vectorised path: {cost['vectorised_us_per_ride']:.2f})", flush=True)
        bodies = batch_bodies(folder)
        env = {"TRIPCAST_HOME": str(folder / "home"), "TRIPCAST_TRAFFIC_MODE": "ab", "MLFLOW_LOGGING_LEVEL": "WARNING",
               "TRIPCAST_CHALLENGER_WEIGHT": "0.1", "MLFLOW_TRACKING_URI": info["tracking_uri"],
               "BENCH_MODEL_DIR": info["model_dir"]}
        bindir = Path(sys.executable).parent
        env["PATH"] = f"{bindir}:{os.environ.get('PATH', '')}"  # mlflow models serve runs `uvicorn` from PATH
        targets = tripcast_targets(folder, args.against, bodies) | {
            "mlflow": Target([str(bindir / "mlflow"), "models", "serve", "-m", f"models:/{info['model']}@champion",
                              "--env-manager", "local", "-p", "{port}", "-w", "1"], "/ping",
                             ("/invocations", MLFLOW_BODY)),
            "bare": Target([sys.executable, "-m", "uvicorn", "endpoints:bare", "--app-dir", str(HERE), "--port",
                            "{port}", "--log-level", "warning"], "/docs", ("/predict", TRIPCAST_BODY)),
            "ceiling": Target([sys.executable, "-m", "uvicorn", "endpoints:hello", "--app-dir", str(HERE), "--port",
                               "{port}", "--log-level", "warning"], "/docs", ("/predict", TRIPCAST_BODY),
                              low_concurrency=True),
        }
        if not args.no_peers:
            targets |= peer_targets(folder, info, bodies)
        ports = {name: target.port or free_port() for name, target in targets.items()}
        urls = {name: f"http://127.0.0.1:{ports[name]}" for name in targets}
        processes = []
        runs: dict[str, dict[str, list[dict]]] = {name: {} for name in targets}
        batches: dict[str, list[dict]] = {}
        try:
            for name, target in list(targets.items()):
                cmd = [part.replace("{port}", str(ports[name])) for part in target.cmd]
                process = start(cmd, env | target.env, urls[name] + target.probe, exit_on_failure=not
                                name.startswith(PEER_PREFIXES))
                if process is None:
                    print(f"{name} did not start: left out", flush=True)
                    del targets[name]
                    continue
                processes.append(process)
            for name, target in targets.items():
                if target.single:
                    wrk(urls[name], *target.single, 4, 2, folder)  # warm-up
            # Rounds interleave the servers, so a slow spell of a shared machine does not land on one of them.
            for round_ in range(1, args.rounds + 1):
                for name, target in targets.items():
                    if target.single is None:
                        continue
                    for c in (16, 4) if target.low_concurrency else (16,):
                        runs[name].setdefault(f"c{c}", []).append(
                            wrk(urls[name], *target.single, c, args.seconds, folder))
                        if target.tripcast:
                            drained(urls[name])
                    line = "  ".join(f"{c} {r[-1]['rps']:6.0f} req/s p99 {r[-1]['p99_ms']:6.2f} ms"
                                     for c, r in runs[name].items())
                    print(f"round {round_} {name:16s} {line}", flush=True)
                for name, target in targets.items():
                    for form, (path, body, content_type) in target.batches.items():
                        key = f"{name}:{form}"
                        batches.setdefault(key, []).append(batch_rate(urls[name], path, body, content_type,
                                                                      args.seconds, folder, target.tripcast))
                        print(f"round {round_} batch {key:24s} {batches[key][-1]['rides_per_s']:9,} rides/s",
                              flush=True)
        finally:
            for process in processes:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    report(args, runs, batches, pyfunc)


PEER_PREFIXES = ("mlserver", "bentoml")


def tripcast_targets(folder: Path, against: str | None, bodies: dict) -> dict[str, Target]:
    serve = [sys.executable, "-m", "tripcast", "serve", "--port", "{port}"]
    forms = {"rows": "rows", "columns": "columns", "v2": "v2", "arrow": "arrow"}

    def batch(form: str) -> tuple[str, Path, str]:
        path = "/v2/models/tripcast-duration/infer" if form == "v2" else "/predict/batch"
        return path, *bodies[form]

    targets = {
        "tripcast": Target(serve, "/ready", ("/predict", TRIPCAST_BODY), {f: batch(f) for f in forms},
                           tripcast=True, low_concurrency=True),
        "tripcast-always": Target(serve, "/ready", ("/predict", TRIPCAST_BODY), {"rows": batch("rows")},
                                  {"TRIPCAST_LOG_FSYNC": "always"}, tripcast=True, low_concurrency=True),
    }
    if against:  # that commit's package, in this environment
        ref = folder / "ref"
        ref.mkdir()
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", against, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        targets["tripcast-ref"] = Target(serve, "/ready", ("/predict", TRIPCAST_BODY), {"rows": batch("rows")},
                                         {"PYTHONPATH": str(ref / "src")}, tripcast=True, low_concurrency=True)
    for name, target in targets.items():
        target.env["TRIPCAST_MONITORING_URI"] = f"sqlite:///{folder / name}.db"  # each its own store
    return targets


def peer_targets(folder: Path, info: dict, bodies: dict) -> dict[str, Target]:
    """MLServer (the MLflow runtime on the registered model with parallel_workers 0 and its default 1, and the
    custom single-row runtime) and BentoML, from their own environments."""
    found: dict[str, Target] = {}
    peer_env = {"PYTHONPATH": str(peers.SRC), "BENCH_MODEL_DIR": info["model_dir"]}
    python = peers.environment("mlserver")
    if python is not None:
        infer = f"/v2/models/{info['model']}/infer"
        for runtime, workers in (("mlflow", 0), ("mlflow", 1), ("custom", 0)):
            ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
            cmd = peers.mlserver(python, folder, info["model_uri"], info["model_dir"], info["model"], ports, runtime,
                                 workers)
            found[f"mlserver-{runtime}-w{workers}"] = Target(
                cmd, "/v2/health/ready", (infer, V2_BODY), {"v2": (infer, *bodies["v2-peer"])}, dict(peer_env),
                port=ports["http"])
    python = peers.environment("bentoml")
    if python is not None:
        found["bentoml"] = Target(peers.bentoml(python, folder, "{port}"), "/readyz", ("/predict", BENTO_BODY),
                                  {"columns": ("/batch", *bodies["bentoml"])},
                                  peer_env | {"BENTOML_HOME": str(folder / "bentoml")})
    return found


def report(args: argparse.Namespace, runs: dict, batches: dict, pyfunc: dict) -> None:
    results = {name: {c: median_run(r) for c, r in by_c.items()} for name, by_c in runs.items() if by_c}
    batch_medians = {key: median_run(b) for key, b in batches.items()}
    for name, by_c in results.items():
        for c, r in by_c.items():
            print(f"{name:16s} {c:>3s}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                  f"  errors {r['errors']}  (median of {args.rounds})"
                  + (f"  STALLED: no answer at all in {r['stalled']} run(s)" if r["stalled"] else ""), flush=True)
    t, h = results["tripcast"], results["ceiling"]
    figures: dict = {
        "benchmark": "serve", "seconds": args.seconds, "rounds": args.rounds, "results": results,
        "batch": batch_medians, "pyfunc": pyfunc,
        "tripcast_vs_ceiling": round(t["c16"]["rps"] / h["c16"]["rps"], 3),
        "p99_c4_vs_ceiling": round(t["c4"]["p99_ms"] / h["c4"]["p99_ms"], 2),
        "batch_rides_per_second": {key.split(":")[1]: b["rides_per_s"] for key, b in batch_medians.items()
                                   if key.startswith("tripcast:")},
    }
    for name in results:
        if name not in ("tripcast", "ceiling"):
            figures[f"tripcast_vs_{name}"] = round(t["c16"]["rps"] / results[name]["c16"]["rps"], 3)
    best_tripcast_batch = max(b["rides_per_s"] for key, b in batch_medians.items()
                              if key.split(":")[0] == "tripcast" and key.split(":")[1] != "rows")
    for key, b in batch_medians.items():
        name = key.split(":")[0]
        if name != "tripcast":
            figures[f"batch_tripcast_vs_{key.replace(':', '_')}"] = round(best_tripcast_batch / b["rides_per_s"], 3)
    peers_single = {n: r["c16"] for n, r in results.items() if n.startswith(PEER_PREFIXES + ("mlflow",))}
    for name, r in peers_single.items():
        print(f"tripcast / {name}: {t['c16']['rps'] / r['rps']:.2f}x req/s at c16; p99 {t['c16']['p99_ms']:.2f} "
              f"vs {r['p99_ms']:.2f} ms")
    if peers_single:
        best = max(peers_single, key=lambda n: peers_single[n]["rps"])
        print(f"best peer, single rides: {best} (target: tripcast >= 1.3x its req/s at c16, and the lowest p99): "
              f"{t['c16']['rps'] / peers_single[best]['rps']:.2f}x; tripcast's p99 lowest: "
              f"{all(t['c16']['p99_ms'] < r['p99_ms'] for r in peers_single.values())}")
    print(f"tripcast / ceiling: {figures['tripcast_vs_ceiling']:.0%} req/s at c16 (target >= 60 %)")
    print(f"p99 at c4: tripcast {t['c4']['p99_ms']:.2f} ms vs ceiling {h['c4']['p99_ms']:.2f} ms = "
          f"{figures['p99_c4_vs_ceiling']:.2f}x (target <= 2x)")
    for key, b in batch_medians.items():
        logged = ""
        if "logged" in b:
            total = b["logged"] + b["dropped"]
            logged = (f"; logged {b['logged'] / total:.0%} ({b['read_back'] / total:.0%} read back from the "
                      f"journal, the last within {b['catch_up_s']:.0f} s), dropped {b['dropped'] / total:.0%}")
        print(f"batches, {key:24s} {b['rides_per_s']:9,.0f} rides/s{logged}")
    mlserver = {k: b["rides_per_s"] for k, b in batch_medians.items() if k.startswith("mlserver")}
    if mlserver:
        best = max(mlserver, key=mlserver.get)
        print(f"best MLServer batch: {best}; tripcast's best columnar form / it: "
              f"{best_tripcast_batch / mlserver[best]:.2f}x (target >= 1.5x, every ride logged)")
    for name in ("tripcast-always", "tripcast-ref"):
        if name in results:
            rows = batch_medians["tripcast:rows"]["rides_per_s"] / batch_medians[f"{name}:rows"]["rides_per_s"]
            figures[f"tripcast_vs_{name}"] = {
                "single_c16": round(t["c16"]["rps"] / results[name]["c16"]["rps"], 3),
                "single_c4": round(t["c4"]["rps"] / results[name]["c4"]["rps"], 3), "batch_rows": round(rows, 3)}
            ratio = figures[f"tripcast_vs_{name}"]
            print(f"tripcast / {name}: single rides {ratio['single_c16']:.1%} (c16), {ratio['single_c4']:.1%} (c4); "
                  f"row-oriented batches {ratio['batch_rows']:.1%}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
