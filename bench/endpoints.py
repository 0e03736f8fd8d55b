"""Reference endpoints for bench/serve.py, on the same stack as tripcast (FastAPI on uvicorn, async handlers):

- ``hello``: returns a constant (the ceiling of the stack);
- ``bare``: the same registered model (its saved pipeline folder), one ride predicted per request through its
  single-row path, nothing else (no validation beyond a dict, no logging, no metrics, no traffic policy):
  what the model alone costs on this stack.
"""

import os
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI

from tripcast.models import TripDurationPipeline

hello = FastAPI()
bare = FastAPI()
_pipeline = TripDurationPipeline.load(Path(os.environ["BENCH_MODEL_DIR"])) if "BENCH_MODEL_DIR" in os.environ else None


@hello.post("/predict")
async def hello_predict(ride: dict) -> dict:
    return {"duration": 1.0}


@bare.post("/predict")
async def bare_predict(ride: dict) -> dict:
    duration = _pipeline.predict_one(ride["PULocationID"], ride["DOLocationID"], ride["trip_distance"], datetime.now())
    return {"duration": duration}
