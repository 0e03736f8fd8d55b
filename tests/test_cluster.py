"""Scale-out on Dask against real clusters: a `dask scheduler` and two `dask worker` processes on loopback, and the
LocalCluster of `--dask local:2`. Training and scoring there give what they give in-process; a worker killed
mid-scoring loses and duplicates nothing; what cannot work is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import eventually
from tests.test_cli import TRIPCAST, run, user_environment
from tripcast import batch, training
from tripcast import features as feats
from tripcast.config import DaskTarget, Settings
from tripcast.data import tlc

pytestmark = [pytest.mark.dask, pytest.mark.slow]
BIN = Path(sys.executable).parent
TRAIN = [tlc.Month(2021, 1), tlc.Month(2021, 2), tlc.Month(2021, 3)]
VALIDATE = tlc.Month(2022, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(address: str, name: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1", "--no-nanny",
                             "--no-dashboard", "--memory-limit", "4GB", *extra], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A real scheduler and two workers (processes of their own, no nanny: a killed worker stays dead)."""
    folder = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = os.environ | {"DASK_DISTRIBUTED__WORKER__DAEMON": "false"}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], env=env, stdout=(folder / "scheduler.log").open("wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
    workers = [_worker(address, f"w{i}", env, folder / f"worker-{i}.log") for i in range(2)]
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
    yield address, workers
    for process in [*workers, scheduler]:
        if process.poll() is None:
            process.terminate()
    for process in [*workers, scheduler]:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _in_process(settings: Settings, months: list[tlc.Month]) -> training.MonthData:
    return training.prepare_months("green", months, [tlc.read_month("green", m, settings) for m in months], settings)


def test_training_on_a_real_cluster_matches_in_process_and_serves_without_dask(
        settings: Settings, dask_cluster: tuple[str, list]) -> None:
    from tripcast.cluster import connect
    from tripcast.cluster.data import month_data
    from tripcast.cluster.training import fitter
    from tripcast.registry import Registry

    address, _ = dask_cluster
    validation = training.read_month_data("green", VALIDATE, settings)
    local = training.train(_in_process(settings, TRAIN), validation, "lightgbm", settings)
    with connect(DaskTarget(address), settings) as client:
        on_cluster = month_data(client, "green", TRAIN, settings)
        assert on_cluster.drops == _in_process(settings, TRAIN).drops  # the same filters, counted on the workers
        assert on_cluster.rides.npartitions == 3
        result = training.train(on_cluster, validation, "lightgbm", settings,
                                features=training.validation_features(validation),
                                fit=fitter(client, on_cluster.rides, feats.Preprocessor()))
    print(f"\nval RMSE in-process {local.val_rmse:.4f}, on the cluster {result.val_rmse:.4f}; rule "
          f"{local.baseline_rmse:.4f} / {result.baseline_rmse:.4f}; train RMSE {local.metrics['train_rmse']:.4f} / "
          f"{result.metrics['train_rmse']:.4f}")
    assert abs(result.val_rmse / local.val_rmse - 1) < 0.01
    assert abs(result.baseline_rmse / local.baseline_rmse - 1) < 0.01
    assert result.val_rmse < 0.8 * result.baseline_rmse  # a model, not noise
    # Registered and served from the registry by a process that never imports Dask.
    registry = Registry(settings)
    version = registry.register(result.model_uri, result.run_id).version
    registry.promote(version)
    rides = validation.rides.head(200)[["PULocationID", "DOLocationID", "trip_distance", "pickup_datetime"]]
    expected = result.pipeline.predict(rides)
    probe = (
        "import json, sys; import pandas as pd; from fastapi.testclient import TestClient\n"
        "from tripcast.config import load_settings; from tripcast.serving.app import create_app\n"
        "rides = pd.read_json(sys.stdin, orient='records', convert_dates=['pickup_datetime'])\n"
        "with TestClient(create_app(load_settings())) as client:\n"
        "    answer = client.post('/predict/batch', json={'rides': [\n"
        "        {**r, 'pickup_datetime': r['pickup_datetime'].isoformat()} for r in rides.to_dict('records')]})\n"
        "    body = answer.json()\n"
        "print(json.dumps({'status': answer.status_code, 'body': body, 'version': answer.headers['X-Model-Version'],\n"
        "                  'dask': sorted(m for m in sys.modules\n"
        "                  if m.split('.')[0] in ('dask', 'distributed'))}))\n")
    served = subprocess.run([sys.executable, "-c", probe], input=rides.to_json(orient="records", date_format="iso"),
                            capture_output=True, text=True, timeout=300, env=os.environ | {"TRIPCAST_DASK": ""})
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200 and answer["dask"] == [], answer
    got = np.array([p["duration"] for p in answer["body"]["predictions"]])
    assert answer["version"] == str(version)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def _synth_months(settings: Settings, folder: Path) -> list[tlc.Month]:
    from tripcast.data.synth import synthesize

    months = [tlc.Month(2021, m) for m in (1, 2, 3)]
    for month in months:
        synthesize("green", tlc.Month(2021, 1), 1_000_000, folder, settings, month, seed=month.month)
    return months


def test_scoring_on_a_cluster_equals_in_process_row_for_row_even_when_a_worker_is_killed(
        settings: Settings, dask_cluster: tuple[str, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tripcast.cluster import connect
    from tripcast.cluster import data as cluster_data
    from tripcast.cluster.scoring import score_months, staging_dir
    from tripcast.models import TripDurationPipeline, build

    address, workers = dask_cluster
    mirror = tmp_path / "synthetic"
    months = _synth_months(settings, mirror)  # from the real green month
    settings = settings.with_overrides(tlc_mirror=str(mirror))
    rides = tlc.read_month("synth-green", months[0], settings)
    pipeline = TripDurationPipeline("lightgbm", build("lightgbm").fit(*_xy(rides)))
    expected = {}
    for month in months:  # the in-process path: batch.scorable_month + batch.score_rides
        scorable, _ = batch.scorable_month("synth-green", month, settings)
        expected[month] = batch.score_rides(scorable, pipeline, "7")
    monkeypatch.setattr(cluster_data, "ROWS_PER_PIECE", 250_000)  # 4 pieces a month
    with connect(DaskTarget(address), settings) as client:
        victim = workers[1]
        outputs = [batch.output_path("synth-green", m, settings) for m in months]
        staging = [staging_dir(p) for p in outputs]

        def kill_when_parts_appear() -> None:
            eventually(lambda: any(len(list(s.glob("part-*.parquet"))) >= 1 for s in staging if s.is_dir()), 120)
            victim.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_when_parts_appear)
        killer.start()
        results = score_months(client, "synth-green", months, pipeline, "7", settings)
        killer.join()
    assert victim.poll() is not None  # the worker was killed while the months were scored
    for month, output, result in zip(months, outputs, results, strict=True):
        got = pd.read_parquet(output)
        assert result["rows"] == len(got) == len(expected[month]) > 900_000
        assert got["ride_id"].is_unique
        pd.testing.assert_frame_equal(got, expected[month])
    assert not any(s.exists() for s in staging)


def _xy(rides: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    kept, _ = feats.clean(rides)
    return feats.Preprocessor().transform(kept), feats.targets(kept)


def test_local_cluster_commands_train_and_score_and_refuse_what_cannot_work(settings: Settings) -> None:
    trained = run(["train", "--train-month", "2021-01", "--train-to", "2021-02", "--val-month", "2021-03",
                   "--dask", "local:2", "--json"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads(trained.stdout)
    assert result["train_month"] == "2021-01..2021-02" and result["promoted"]
    drops = _in_process(settings, [tlc.Month(2021, 1), tlc.Month(2021, 2)]).drops
    from mlflow import MlflowClient

    logged = MlflowClient(settings.resolved_tracking_uri).get_run(result["run_id"]).data.metrics
    assert (logged["train_rows_in"], logged["train_rows_out"]) == (drops.rows_in, drops.rows_out)  # counted there
    scored = run(["score", "--month", "2021-02", "--dask", "local:2"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    frame = pd.read_parquet(batch.output_path("green", tlc.Month(2021, 2), settings))
    assert len(frame) > 60_000 and frame["ride_id"].is_unique and frame["model_version"].eq("1").all()
    # What cannot work: one line each, exit status 2, nothing written.
    port = _free_port()
    for args, says in (
        (["train", "--dask", f"tcp://127.0.0.1:{port}"], f"no Dask scheduler answers at tcp://127.0.0.1:{port}"),
        (["train", "--dask", "yarn"], "TRIPCAST_DASK='yarn' is not allowed"),
        (["train", "--model", "linear", "--dask", "local:2"], "model 'linear' trains in-process only"),
        (["train", "--trials", "3", "--dask", "local:2"], "tuning (--trials, --timeout) runs in-process only"),
    ):
        refused = run(args + ["--train-month", "2021-01", "--val-month", "2021-02"],
                      {"TRIPCAST_DASK_CONNECT_SECONDS": "2"})
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and says in lines[0], refused.stderr[-2000:]


def test_workers_without_tripcast_are_one_line(settings: Settings, tmp_path: Path) -> None:
    """A worker whose Python cannot import tripcast (the editable install hidden from it)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    source = str(Path(__file__).resolve().parents[1] / "src")  # where the editable install's .pth points
    hide = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'tripcast' not in repr(f).lower() and "
            "'editable' not in repr(f).lower()]; sys.path = [p for p in sys.path if p != sys.argv[2]]\n"
            "from distributed.cli.dask_worker import main; sys.argv = ['dask-worker', sys.argv[1], '--no-nanny', "
            "'--no-dashboard']; main()")
    worker = subprocess.Popen([sys.executable, "-c", hide, address, source], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        refused = run(["score", "--month", "2021-01", "--dask", address], {"TRIPCAST_DASK_CONNECT_SECONDS": "30"})
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
        assert "cannot import tripcast" in lines[0] and address in lines[0]
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(timeout=20)


def test_synthetic_months_say_what_they_are(settings: Settings, tmp_path: Path) -> None:
    made = run(["data", "synth", "--like", "green", "2021-01", "--rides", "300k", "--month", "2021-04",
                "--out", str(tmp_path)])
    assert made.returncode == 0, made.stderr
    path = tmp_path / "synth-green_tripdata_2021-04.parquet"
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    assert meta.metadata.num_rows == 300_000 and b"not TLC data" in meta.schema_arrow.metadata[b"tripcast.synthetic"]
    rides = tlc.read_month("synth-green", tlc.Month(2021, 4), settings.with_overrides(tlc_mirror=str(tmp_path)))
    assert rides["pickup_datetime"].min() >= pd.Timestamp("2021-04-01")
    assert rides["pickup_datetime"].max() < pd.Timestamp("2021-05-01")
    real = tlc.read_month("green", tlc.Month(2021, 1), settings)
    # Resampled: the zone mix and the median duration of the month it came from, within a few per cent.
    assert abs(np.median(feats.duration_minutes(rides)) / np.median(feats.duration_minutes(real)) - 1) < 0.05
    top = real["PULocationID"].value_counts(normalize=True).head(5)
    np.testing.assert_allclose(rides["PULocationID"].value_counts(normalize=True)[top.index], top, atol=0.01)
    bad = run(["data", "synth", "--like", "green", "2021-01", "--rides", "lots", "--out", str(tmp_path)])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --rides 'lots' is not a count (e.g. 2000000, 2M, 500k)"


def test_a_worker_out_of_memory_is_one_line_and_nothing_is_registered(settings: Settings, tmp_path: Path) -> None:
    from tripcast.data.synth import synthesize
    from tripcast.registry import Registry

    mirror = tmp_path / "synthetic"
    for month in (tlc.Month(2021, 1), tlc.Month(2021, 2)):
        synthesize("green", tlc.Month(2021, 1), 2_000_000, mirror, settings, month)
    refused = run(["train", "--color", "synth-green", "--train-month", "2021-01", "--val-month", "2021-02",
                   "--dask", "local:2"], {"TRIPCAST_TLC_MIRROR": str(mirror), "TRIPCAST_DASK_WORKER_MEMORY_GB": "0.5"},
                  timeout=600)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("error: Dask workers of local:2 died running ") and "out of memory?" in lines[0]
    assert Registry(settings).versions() == []


def test_a_worker_lost_while_lightgbm_trains_is_one_line_not_a_hang(settings: Settings, tmp_path: Path) -> None:
    """lightgbm.dask pins its tasks to the workers it began on: one lost while it trained (restarted under a new
    address) left the training waiting for ever. A worker killed as the training starts: one line, soon."""
    import psutil

    from tripcast.data.synth import synthesize

    mirror = tmp_path / "synthetic"
    for month in (tlc.Month(2021, 1), tlc.Month(2021, 2)):  # a fit of seconds, not a fraction of one
        synthesize("green", tlc.Month(2021, 1), 1_000_000, mirror, settings, month)
    began = time.monotonic()
    command = subprocess.Popen(TRIPCAST + ["train", "-v", "--color", "synth-green", "--train-month", "2021-01",
                                           "--val-month", "2021-02", "--dask", "local:2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=user_environment({"TRIPCAST_TLC_MIRROR": str(mirror)}))
    try:
        for line in command.stderr:
            if "Finding random open ports" in line:  # lightgbm.dask's first step
                break
        workers = [p for p in psutil.Process(command.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[0].kill()
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.append(command.stderr.read()), daemon=True)
        reader.start()
        returncode = command.wait(timeout=120)  # without the watch, it waited for ever
        reader.join(30)
    finally:
        command.kill()
    said = "".join(rest)
    assert returncode == 2, said[-4000:]
    errors = [line for line in said.splitlines() if line.startswith("error: ")]  # -v: the rest are logs
    assert len(errors) == 1, said[-3000:]
    assert errors[0].startswith("error: Dask workers of local:2 died running lightgbm_training (out of memory? ")
    assert time.monotonic() - began < 120
    from tripcast.registry import Registry

    assert Registry(settings).versions() == []


def test_yellow_and_fhvhv_in_their_published_schemas_read_the_same_per_piece_as_in_process(
        settings: Settings, tmp_path: Path) -> None:
    """Small files in the TLC's own schemas: yellow 2023-01 spells airport_fee as later months do not, fhvhv has
    trip_miles and its own columns; pieces (what a worker reads) normalise and filter them as in-process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tripcast.cluster.data import Filter, clean_piece, pieces

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    n = 1_000
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2023-01-01") + pd.to_timedelta(rng.integers(0, 30 * 86_400, n), unit="s")
    stop = start + pd.to_timedelta(rng.integers(-60, 90 * 60, n), unit="s")  # some negative: filtered
    zones = {"PULocationID": pa.array(rng.integers(0, 270, n), pa.int64()),
             "DOLocationID": pa.array(rng.integers(1, 266, n), pa.int32())}
    for fee in ("airport_fee", "Airport_fee"):
        month = "2023-01" if fee == "airport_fee" else "2023-02"
        shift = pd.Timedelta(days=31) if month == "2023-02" else pd.Timedelta(0)
        pq.write_table(pa.table({"VendorID": pa.array([1] * n, pa.int64()),
                                 "tpep_pickup_datetime": pa.array(start + shift, pa.timestamp("us")),
                                 "tpep_dropoff_datetime": pa.array(stop + shift, pa.timestamp("us")),
                                 "passenger_count": pa.array([1.0] * n), "trip_distance": rng.exponential(3, n),
                                 **zones, fee: pa.array([1.25] * n)}),
                       mirror / f"yellow_tripdata_{month}.parquet", row_group_size=300)
    pq.write_table(pa.table({"hvfhs_license_num": ["HV0003"] * n, "dispatching_base_num": ["B03404"] * n,
                             "request_datetime": pa.array(start, pa.timestamp("ns")),
                             "pickup_datetime": pa.array(start, pa.timestamp("ns")),
                             "dropoff_datetime": pa.array(stop, pa.timestamp("ns")), **zones,
                             "trip_miles": rng.exponential(4, n), "trip_time": pa.array([600] * n, pa.int64()),
                             "base_passenger_fare": rng.exponential(20, n), "shared_request_flag": ["N"] * n}),
                   mirror / "fhvhv_tripdata_2023-01.parquet", row_group_size=300)
    local = settings.with_overrides(tlc_mirror=str(mirror))
    rules = Filter.training(local)
    for color, month in (("yellow", "2023-01"), ("yellow", "2023-02"), ("fhvhv", "2023-01")):
        m = tlc.Month.parse(month)
        whole = training.read_month_data(color, m, local)
        parts = [clean_piece(p, rules) for p in pieces(color, [m], local, rows=300)]
        assert len(parts) == 4  # row groups of 300 rides
        together = pd.concat([frame for frame, _ in parts], ignore_index=True)
        pd.testing.assert_frame_equal(together, whole.rides)
        assert sum((report for _, report in parts), feats.DropReport(0)) == whole.drops
        assert whole.drops.dropped["zone_out_of_range"] > 0 and whole.drops.dropped["duration_below_min"] > 0
        assert list(whole.rides.columns) == [*tlc.CANONICAL_COLUMNS, feats.TARGET]
