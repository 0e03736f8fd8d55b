"""Reference endpoints for bench/serve.py, on the same stack as tripcast (FastAPI on uvicorn, async handlers):

- ``hello``: returns a constant (the ceiling of the stack);
- ``bare``: the same LightGBM model file, one row predicted per request, nothing else (no validation beyond a
  dict, no logging, no metrics, no traffic policy): what the model alone costs on this stack.
"""

import os
from datetime import datetime

import lightgbm as lgb
import numpy as np
from fastapi import FastAPI

hello = FastAPI()
bare = FastAPI()
_booster = lgb.Booster(model_file=os.environ["BENCH_MODEL_FILE"]) if "BENCH_MODEL_FILE" in os.environ else None


@hello.post("/predict")
async def hello_predict(ride: dict) -> dict:
    return {"duration": 1.0}


@bare.post("/predict")
async def bare_predict(ride: dict) -> dict:
    now = datetime.now()
    row = np.array([[ride["PULocationID"], ride["DOLocationID"], ride["trip_distance"], now.hour, now.weekday()]],
                   dtype=np.float64)
    return {"duration": float(_booster.predict(row, num_threads=1)[0])}
