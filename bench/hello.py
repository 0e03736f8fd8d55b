"""The ceiling for bench/serve.py: a hello-world endpoint on the same stack (FastAPI on uvicorn)."""

from fastapi import FastAPI

app = FastAPI()


@app.post("/predict")
async def predict(ride: dict) -> dict:
    return {"duration": 1.0}
