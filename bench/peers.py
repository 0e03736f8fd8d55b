"""The servers an ML engineer would pick instead of tripcast, for bench/serve.py: Seldon MLServer (its MLflow
runtime on the registered model, and a small custom runtime calling the pipeline's single-row path) and
BentoML (a service around the same pipeline). Each runs from its own virtual environment, made here once and
kept in ``~/.cache/tripcast-bench`` (so tripcast's pins do not constrain it); a peer that cannot be installed
is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"  # the peers import the pipeline from here (PYTHONPATH)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tripcast-bench"
MODEL_DEPS = ["lightgbm>=4.3,<5", "pandas>=2.2,<3", "numpy<3", "scikit-learn>=1.5,<1.10"]
REQUIREMENTS = {
    # MLServer 1.7's default parallel workers need uvloop < 0.22 (SeldonIO/MLServer#2286).
    "mlserver": ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop<0.22", *MODEL_DEPS],
    "bentoml": ["bentoml>=1.4,<1.5", *MODEL_DEPS],
}

MLSERVER_RUNTIME = '''"""An MLServer runtime calling the tripcast pipeline: one ride through its single-row path,
a batch vectorised; the strongest MLServer configuration for this model."""
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from tripcast.features import local_naive
from tripcast.models import TripDurationPipeline


class TripcastRuntime(MLModel):
    async def load(self) -> bool:
        self.pipeline = TripDurationPipeline.load(Path(self.settings.parameters.uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        data = {i.name: i.data.root for i in payload.inputs}
        n = len(data["trip_distance"])
        if n == 1:
            durations = [self.pipeline.predict_one(int(data["PULocationID"][0]), int(data["DOLocationID"][0]),
                                                   float(data["trip_distance"][0]), local_naive(None))]
        else:
            pickup = np.full(n, np.datetime64(local_naive(None), "us"))
            features = self.pipeline.preprocessor.features(
                np.asarray(data["PULocationID"], np.int32), np.asarray(data["DOLocationID"], np.int32),
                np.asarray(data["trip_distance"], np.float64), pickup)
            durations = self.pipeline.predict_features(features).tolist()
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name="duration", shape=[n], datatype="FP64", data=durations)])
'''

BENTO_SERVICE = '''"""A BentoML service around the tripcast pipeline: one ride through its single-row path, a batch
(one list per input) vectorised."""
import os
from pathlib import Path

import bentoml
import numpy as np

from tripcast.features import local_naive
from tripcast.models import TripDurationPipeline


@bentoml.service(workers=1)
class Tripcast:
    def __init__(self) -> None:
        self.pipeline = TripDurationPipeline.load(Path(os.environ["BENCH_MODEL_DIR"]))

    @bentoml.api
    async def predict(self, PULocationID: int, DOLocationID: int, trip_distance: float) -> dict:
        return {"duration": self.pipeline.predict_one(PULocationID, DOLocationID, trip_distance, local_naive(None))}

    @bentoml.api
    async def batch(self, PULocationID: list[int], DOLocationID: list[int], trip_distance: list[float]) -> dict:
        n = len(trip_distance)
        features = self.pipeline.preprocessor.features(
            np.asarray(PULocationID, np.int32), np.asarray(DOLocationID, np.int32),
            np.asarray(trip_distance, np.float64), np.full(n, np.datetime64(local_naive(None), "us")))
        return {"duration": self.pipeline.predict_features(features).tolist()}
'''


def environment(peer: str) -> Path | None:
    """The peer's Python, from its own virtual environment (made on first use); None, said, if it cannot be
    installed."""
    requirements = REQUIREMENTS[peer]
    key = hashlib.sha256(json.dumps([sys.version_info[:2], requirements]).encode()).hexdigest()[:10]
    folder = CACHE / f"{peer}-{key}"
    python = folder / "bin" / "python"
    if (folder / ".complete").exists():
        return python
    print(f"installing {peer} into {folder} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True,
                       capture_output=True, text=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        said = (getattr(exc, "stderr", None) or "").strip().splitlines()[-3:]
        print(f"{peer} could not be installed, left out: {' / '.join(said) or exc}", flush=True)
        return None
    (folder / ".complete").touch()
    return python


def mlserver(python: Path, folder: Path, model_uri: str, model_dir: str, name: str, ports: dict[str, int],
             runtime: str, workers: int) -> list[str]:
    """The command starting MLServer with one model: ``runtime`` "mlflow" (mlserver-mlflow on the registered
    pyfunc) or "custom" (``TripcastRuntime`` above); ``workers`` is MLServer's ``parallel_workers``."""
    models = folder / f"mlserver-{runtime}-{workers}"
    models.mkdir(parents=True, exist_ok=True)
    (models / "runtime_tripcast.py").write_text(MLSERVER_RUNTIME)
    implementation = "mlserver_mlflow.MLflowRuntime" if runtime == "mlflow" else "runtime_tripcast.TripcastRuntime"
    uri = model_uri if runtime == "mlflow" else model_dir
    (models / "model-settings.json").write_text(json.dumps(
        {"name": name, "implementation": implementation, "parameters": {"uri": uri}}))
    (models / "settings.json").write_text(json.dumps(
        {"http_port": ports["http"], "grpc_port": ports["grpc"], "metrics_port": ports["metrics"],
         "parallel_workers": workers, "debug": False}))
    return [str(python.with_name("mlserver")), "start", str(models)]


def bentoml(python: Path, folder: Path, port: int | str) -> list[str]:
    (folder / "bento_tripcast.py").write_text(BENTO_SERVICE)
    return [str(python.with_name("bentoml")), "serve", "bento_tripcast:Tripcast", "--port", str(port),
            "--working-dir", str(folder)]
