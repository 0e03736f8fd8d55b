"""A model version is checked before any process serves it, in three steps:

1. its files' SHA-256 digests equal those training recorded when it logged them (tag ``DIGESTS_TAG``);
2. a short-lived process loads it and scores its reference rides, so a file that makes LightGBM's C++ code
   abort or crash kills that process, not the one asking;
3. the asking process, after loading it, scores the same rides: every prediction must equal, bit for bit,
   the one recorded at training time (the reference holds them), before the model is used.

Run as ``python -m tripcast.models.verify PIPELINE_FOLDER REFERENCE`` for step 2 (exit 0: it holds).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from functools import cache
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from tripcast.errors import ModelVerificationError, RegistryError

DIGESTS_TAG = "tripcast.sha256"  # on the training run: {artifact path: SHA-256} of what it logged
PIPELINE_ARTIFACT = "pipeline"  # the pipeline's folder inside the logged model's artifacts
REFERENCE_ARTIFACT = "reference/validation.parquet"  # validation features, predictions and durations
FEATURE_COLUMNS = ["PULocationID", "DOLocationID", "zone_pair", "trip_distance", "pickup_hour", "pickup_dow"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pipeline_digests(folder: Path) -> dict[str, str]:
    """``{"pipeline/<file>": sha256}`` for every file of a saved pipeline."""
    return {f"{PIPELINE_ARTIFACT}/{p.relative_to(folder).as_posix()}": sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_digests(recorded: dict[str, str], found: dict[str, str]) -> None:
    """Every recorded file is there with its recorded digest, and no file was added."""
    for name, digest in recorded.items():
        if name not in found:
            raise ModelVerificationError(f"{name} is missing")
        if found[name] != digest:
            raise ModelVerificationError(f"{name} is not the file training logged (its SHA-256 differs)")
    added = sorted(set(found) - set(recorded))
    if added:
        raise ModelVerificationError(f"{added[0]} was not logged by training")


def check_predictions(pipeline, reference: pd.DataFrame) -> None:
    """The pipeline's predictions on the reference rides equal those recorded at training, exactly."""
    if "prediction" not in reference or reference.empty:
        raise ModelVerificationError("its reference holds no recorded predictions to check it against")
    predicted = pipeline.predict_features({c: reference[c].to_numpy() for c in FEATURE_COLUMNS})
    recorded = reference["prediction"].to_numpy(np.float64)
    differ = ~((predicted == recorded) | (np.isnan(predicted) & np.isnan(recorded)))
    if differ.any():
        gap = np.nanmax(np.abs(predicted - recorded)[differ]) if not np.isnan(predicted[differ]).all() else np.nan
        raise ModelVerificationError(f"it predicts {int(differ.sum()):,} of its {len(recorded):,} reference rides "
                                     f"differently from training (by up to {gap:.3g} min)")


def check_once_in_subprocess(folder: Path, digests: dict[str, str], reference: Path, timeout: float,
                             passed: Path) -> None:
    """Step 2, unless these very files (``digests``) passed it before with the same code and libraries: a marker
    in ``passed`` remembers it, so the other workers of a server, and a restart, need not check again."""
    key = json.dumps({"pipeline": digests, "reference": sha256(reference), "code": _code_digest()}, sort_keys=True)
    marker = passed / f"{hashlib.sha256(key.encode()).hexdigest()}.passed"
    if marker.exists():
        return
    check_in_subprocess(folder, reference, timeout)
    passed.mkdir(parents=True, exist_ok=True)
    marker.touch()


@cache
def _code_digest() -> str:
    """What loading and scoring a pipeline depends on: Python, the libraries, and tripcast's own model code."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(sys.version.encode())
    for name in ("lightgbm", "numpy", "pandas", "scikit-learn", "pyarrow"):
        digest.update(f"{name}={version(name)}".encode())
    for path in sorted([*package.joinpath("models").glob("*.py"), package / "features.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_in_subprocess(folder: Path, reference: Path, timeout: float) -> None:
    """Step 2 in a child process; its native crash or hang becomes a ``ModelVerificationError`` here."""
    command = [sys.executable, "-m", "tripcast.models.verify", str(folder), str(reference)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckTimeout(f"loading and scoring it took over {timeout:g} s (TRIPCAST_VERIFY_TIMEOUT_SECONDS)") \
            from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise ModelVerificationError(f"loading and scoring it crashed a checking process ({name})")
    if done.returncode != 0:
        # As bytes: a garbled model file's bytes come back in LightGBM's error message.
        lines = [line for line in done.stderr.decode(errors="replace").strip().splitlines() if line.strip()]
        raise ModelVerificationError(lines[-1] if lines else f"its checking process exited {done.returncode}")


class CheckTimeout(RegistryError):
    """The check did not finish in time: maybe a busy machine, so not held against the version (not a failed
    verification): tried again later."""


def recorded_digests(tags: dict[str, str]) -> dict[str, str] | None:
    """The digests a training run recorded; None for a run logged before tripcast recorded them."""
    raw = tags.get(DIGESTS_TAG)
    return None if raw is None else json.loads(raw)


def _main(folder: str, reference: str) -> int:
    from tripcast.models import TripDurationPipeline

    try:
        check_predictions(TripDurationPipeline.load(Path(folder)), pd.read_parquet(reference))
    except ModelVerificationError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Exception as exc:  # any failure to load is the version's, said in one (printable) line
        said = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print("it does not load: " + "".join(c if c.isprintable() else "?" for c in said), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
