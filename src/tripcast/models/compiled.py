"""LightGBM trees compiled to native code with lleaves (LLVM), for batches: ~10x LightGBM's own predict on
the default model, with the identical figures.

Identical because each tree's output is added to a ride's sum one at a time, in LightGBM's order
(``fblocksize=1``; lleaves' default blocks of trees sum in another order, a few ulps off). Whatever lleaves
does, a compiled model is used only once its figures equal LightGBM's, to the bit, on probe rows.

Compiled code is kept per model, lleaves/LLVM version and host CPU (code built for another CPU could crash the
process on an instruction this one lacks), written atomically with its digest, and loaded again only if the
digest holds: LLVM aborts the process on a damaged object file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)
Predict = Callable[[np.ndarray], np.ndarray]  # a float64 matrix (rows x features) -> one figure per row


def compile_booster(booster: lgb.Booster, probe: np.ndarray, cache: Path) -> Predict | None:
    """``booster``'s trees as native code, or None (said in the log) when lleaves is not installed, fails, or
    predicts ``probe`` (a float64 matrix) other than LightGBM does."""
    try:
        import lleaves
        from llvmlite import binding
    except ImportError:
        return None
    text = booster.model_to_string()
    key = hashlib.sha256("\n".join([text, version("lleaves"), _llvmlite_version(), binding.get_host_cpu_name(),
                                    binding.get_host_cpu_features().flatten()]).encode()).hexdigest()[:24]
    cache.mkdir(parents=True, exist_ok=True)
    target, digest = cache / f"lightgbm-{key}.so", cache / f"lightgbm-{key}.sha256"
    try:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            model_file = Path(tmp) / "model.txt"
            model_file.write_text(text)
            model = lleaves.Model(model_file=str(model_file))
            # LLVM aborts the process on a damaged object file: a kept one is loaded only if its digest holds.
            if target.exists() and digest.exists() and _sha256(target) == digest.read_text():
                model.compile(cache=str(target), fblocksize=1)
            else:  # built beside, renamed into place: a process stopped mid-way leaves no half-written library
                building = Path(tmp) / "model.so"
                model.compile(cache=str(building), fblocksize=1)
                (Path(tmp) / "model.sha256").write_text(_sha256(building))
                os.replace(building, target)
                os.replace(Path(tmp) / "model.sha256", digest)
    except Exception as exc:  # whatever went wrong, LightGBM's own predict still answers
        log.warning("could not compile the LightGBM model (%s: %s); batches use LightGBM's predict",
                    type(exc).__name__, str(exc)[:200])
        return None

    def predict(matrix: np.ndarray) -> np.ndarray:
        return model.predict(matrix, n_jobs=1)

    expected = booster.predict(probe, num_threads=1)
    if not np.array_equal(predict(probe), expected):
        log.warning("the compiled LightGBM model predicts other figures than LightGBM; not used")
        return None
    return predict


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _llvmlite_version() -> str:
    try:
        return version("llvmlite")
    except PackageNotFoundError:
        return "?"
