"""The MLflow pyfunc wrapper, logged as code ("models from code") so loading unpickles nothing:
the estimator and preprocessor are read from JSON / LightGBM text files in the model's artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model

from tripcast.models import TripDurationPipeline


class TripDurationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.pipeline = TripDurationPipeline.load(Path(context.artifacts["pipeline"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.pipeline.predict(model_input)


set_model(TripDurationModel())
