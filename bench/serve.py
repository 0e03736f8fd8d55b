"""Benchmark: the same registered champion served by tripcast, by `mlflow models serve`, by a bare FastAPI +
LightGBM endpoint (the model alone), and a hello-world endpoint on the same server stack (the ceiling); one
worker each, driven by wrk on loopback.

    TRIPCAST_TLC_MIRROR=../shared/data/tlc python bench/serve.py [--seconds 10] [--rounds 3] [--against REF]

tripcast runs with everything on: the prediction log (SQLite), Prometheus metrics and an A/B traffic policy
(10 % challenger). All four run at once and are measured in interleaved rounds (medians of ``--rounds``).
Prints requests/s, p50, p99 and errors for each at concurrency 16 and 4, the ratios tripcast/mlflow and
tripcast/ceiling, the batch endpoint's rides/s (wrk, one connection, 10,000 rides a request), and ends with
one JSON line.
Targets: >= 10x mlflow's req/s, >= 60 % of the ceiling at c16, p99 at c4 within 2x the ceiling's, batch
>= 200,000 rides/s. Needs wrk (Debian: apt-get install wrk).

Also measured beside them: tripcast with ``TRIPCAST_LOG_FSYNC=always`` (every answer waits for the disk), and,
with ``--against REF``, tripcast as of a git commit (its ``src`` from ``git archive``, in this environment):
what a change cost the request path, e.g. the journal that makes every answered prediction durable (target:
within 10 % of the commit before it, single rides and batches). Each tripcast has its own monitoring store.
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
from pathlib import Path

import httpx

from tripcast.rehearsal import free_port

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
wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
"""
TRIPCAST_BODY = ('string.format(\'{"PULocationID": %d, "DOLocationID": %d, "trip_distance": %.1f, '
                 '"ride_id": "r%d"}\', z[1], z[2], z[3], counter)')
MLFLOW_BODY = ('string.format(\'{"dataframe_records": [{"PULocationID": %d, "DOLocationID": %d, '
               '"trip_distance": %.1f}]}\', z[1], z[2], z[3])')


def start(cmd: list[str], env: dict, probe: str, timeout: float = 120) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            sys.exit(f"{cmd[0]} exited: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.3)
    process.kill()
    sys.exit(f"{' '.join(cmd)} did not come up")


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
    return {"tracking_uri": settings.resolved_tracking_uri, "model": settings.model_name, "model_dir": str(model_dir)}


def log_state(url: str) -> dict:
    """The prediction log's counters; a server before the journal had a spool instead (``spooled``)."""
    state = httpx.get(f"{url}/model", timeout=10).json()["prediction_log"]
    return state | {"settled": not state["queued"] and (state["replayed"] >= state["spooled"] if "spooled" in state
                                                        else not state["journal_backlog_bytes"])}


def batch_rate(url: str, seconds: int, folder: Path, rides: int = 10_000) -> dict:
    """The batch endpoint under wrk: one connection posting the same 10,000 rides back to back; and what the
    prediction log made of them (written, or dropped and counted when its queue overflowed)."""
    before = log_state(url)
    body = folder / "batch.json"
    body.write_text(json.dumps({"rides": [{"PULocationID": 1 + i % 265, "DOLocationID": 1 + (i * 7) % 265,
                                           "trip_distance": 0.5 + i % 20, "ride_id": f"b{i}"} for i in range(rides)]}))
    script = folder / "batch.lua"
    script.write_text(BATCH_LUA.replace("@BODY@", str(body)) + DONE_LUA)
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", str(script), f"{url}/predict/batch"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    started = time.perf_counter()
    drained(url)
    after = log_state(url)
    return result | {"rides_per_s": round(result["rps"] * rides), "logged": after["written"] - before["written"],
                     "dropped": after["dropped"] - before["dropped"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and concurrency (medians reported)")
    parser.add_argument("--against", metavar="REF", help="also serve tripcast as of this git commit")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/serve.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("training and registering the champion ...", flush=True)
        info = prepare(folder / "home")
        ports = {name: free_port() for name in ("tripcast", "tripcast-always", "mlflow", "bare", "ceiling")}
        env = {"TRIPCAST_HOME": str(folder / "home"), "TRIPCAST_TRAFFIC_MODE": "ab", "MLFLOW_LOGGING_LEVEL": "WARNING",
               "TRIPCAST_CHALLENGER_WEIGHT": "0.1", "MLFLOW_TRACKING_URI": info["tracking_uri"],
               "BENCH_MODEL_DIR": info["model_dir"]}
        bindir = Path(sys.executable).parent
        env["PATH"] = f"{bindir}:{os.environ.get('PATH', '')}"  # mlflow models serve runs `uvicorn` from PATH
        serve = [sys.executable, "-m", "tripcast", "serve", "--port"]
        own = {name: {"TRIPCAST_MONITORING_URI": f"sqlite:///{folder / name}.db"} for name in TRIPCASTS}
        own["tripcast-always"]["TRIPCAST_LOG_FSYNC"] = "always"
        if args.against:  # that commit's package, in this environment
            ref = folder / "ref"
            ref.mkdir()
            archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", args.against, "src"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
            own["tripcast-ref"]["PYTHONPATH"] = str(ref / "src")
            ports["tripcast-ref"] = free_port()
        targets = {
            name: (serve + [str(ports[name])], "/ready", "/predict", TRIPCAST_BODY)
            for name in TRIPCASTS if name in ports
        } | {
            "mlflow": ([str(bindir / "mlflow"), "models", "serve", "-m", f"models:/{info['model']}@champion",
                        "--env-manager", "local", "-p", str(ports["mlflow"]), "-w", "1"], "/ping", "/invocations",
                       MLFLOW_BODY),
            "bare": ([sys.executable, "-m", "uvicorn", "endpoints:bare", "--app-dir", str(HERE), "--port",
                      str(ports["bare"]), "--log-level", "warning"], "/docs", "/predict", TRIPCAST_BODY),
            "ceiling": ([sys.executable, "-m", "uvicorn", "endpoints:hello", "--app-dir", str(HERE), "--port",
                         str(ports["ceiling"]), "--log-level", "warning"], "/docs", "/predict", TRIPCAST_BODY),
        }
        urls = {name: f"http://127.0.0.1:{ports[name]}" for name in targets}
        processes = [start(cmd, env | own.get(name, {}), urls[name] + probe)
                     for name, (cmd, probe, _, _) in targets.items()]
        runs: dict[str, dict[str, list[dict]]] = {name: {"c16": [], "c4": []} for name in targets}
        try:
            for name, (_, _, path, body) in targets.items():
                wrk(urls[name], path, body, 4, 2, folder)  # warm-up
            # Rounds interleave the servers, so a slow spell of a shared machine does not land on one of them.
            for round_ in range(1, args.rounds + 1):
                for name, (_, _, path, body) in targets.items():
                    for c in (16, 4):
                        runs[name][f"c{c}"].append(wrk(urls[name], path, body, c, args.seconds, folder))
                        if name in TRIPCASTS:
                            drained(urls[name])
                    line = "  ".join(f"{c} {r[-1]['rps']:6.0f} req/s p99 {r[-1]['p99_ms']:6.2f} ms"
                                     for c, r in runs[name].items())
                    print(f"round {round_} {name:8s} {line}", flush=True)
            batches: dict[str, list[dict]] = {name: [] for name in targets if name in TRIPCASTS}
            for _ in range(args.rounds):
                for name in batches:
                    batches[name].append(batch_rate(urls[name], args.seconds, folder))
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
    results = {name: {c: median_run(r) for c, r in by_c.items()} for name, by_c in runs.items()}
    batch_medians = {name: median_run(b) for name, b in batches.items()}
    batch_median = batch_medians["tripcast"]
    for name, by_c in results.items():
        for c, r in by_c.items():
            print(f"{name:8s} {c:>3s}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                  f"  errors {r['errors']}  (median of {args.rounds})"
                  + (f"  STALLED: no answer at all in {r['stalled']} run(s)" if r["stalled"] else ""), flush=True)
    t, m, b, h = results["tripcast"], results["mlflow"], results["bare"], results["ceiling"]
    figures = {
        "benchmark": "serve", "seconds": args.seconds, "results": results,
        "tripcast_vs_mlflow": round(t["c16"]["rps"] / m["c16"]["rps"], 2),
        "tripcast_vs_ceiling": round(t["c16"]["rps"] / h["c16"]["rps"], 3),
        "tripcast_vs_bare_model": round(t["c16"]["rps"] / b["c16"]["rps"], 3),
        "p99_c4_vs_ceiling": round(t["c4"]["p99_ms"] / h["c4"]["p99_ms"], 2),
        "batch_rides_per_second": batch_median["rides_per_s"], "batch": batch_medians, "rounds": args.rounds,
    }
    for name in ("tripcast-always", "tripcast-ref"):
        if name in results:
            figures[f"tripcast_vs_{name}"] = {
                "single_c16": round(t["c16"]["rps"] / results[name]["c16"]["rps"], 3),
                "single_c4": round(t["c4"]["rps"] / results[name]["c4"]["rps"], 3),
                "batch": round(batch_median["rides_per_s"] / batch_medians[name]["rides_per_s"], 3)}
    print(f"tripcast / mlflow models serve: {figures['tripcast_vs_mlflow']:.1f}x req/s at c16 (target >= 10x)")
    print(f"tripcast / ceiling: {figures['tripcast_vs_ceiling']:.0%} req/s at c16 (target >= 60 %)")
    print(f"tripcast / bare FastAPI + LightGBM: {figures['tripcast_vs_bare_model']:.0%} req/s at c16 "
          "(what logging, metrics, validation and the A/B policy cost)")
    print(f"p99 at c4: tripcast {t['c4']['p99_ms']:.2f} ms vs ceiling {h['c4']['p99_ms']:.2f} ms = "
          f"{figures['p99_c4_vs_ceiling']:.2f}x (target <= 2x)")
    for name, b in batch_medians.items():
        total = b["logged"] + b["dropped"]
        print(f"batch endpoint, {name}: {b['rides_per_s']:,} rides/s (target >= 200,000); the prediction log kept "
              f"{b['logged'] / total:.0%} of them ({b['read_back'] / total:.0%} read back from its journal or spool, "
              f"written within {b['catch_up_s']:.0f} s after the run), dropped {b['dropped'] / total:.0%} (counted)")
    for name in ("tripcast-always", "tripcast-ref"):
        if name in results:
            ratio = figures[f"tripcast_vs_{name}"]
            print(f"tripcast / {name}: single rides {ratio['single_c16']:.1%} (c16), {ratio['single_c4']:.1%} (c4); "
                  f"batches {ratio['batch']:.1%}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
