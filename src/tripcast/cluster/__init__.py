"""A Dask cluster for the commands that read months (TRIPCAST_DASK, ``--dask``): connect, check, fail in one line.

``local``/``local:N`` start a LocalCluster of N worker processes for the command and stop it after;
``tcp://host:8786`` joins an existing cluster (Kubernetes, HPC, cloud: Dask's own deployment packages start it).
The rest of tripcast sees a ``distributed.Client``: data, training and scoring on it live in this package's
modules; the core (data, features, models, training) does not import Dask, and serving never needs it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from tripcast.config import DaskTarget, Settings
from tripcast.errors import TripcastError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


class ClusterError(TripcastError):
    """The Dask cluster cannot be reached, lacks tripcast or cannot do the work (a worker died)."""


class WorkerLost(ClusterError):
    """A worker died while ``task`` ran on it where distributed would not notice (``connect`` words it)."""

    def __init__(self, task: str) -> None:
        super().__init__(f"a Dask worker died running {task}")
        self.task = task


TRAINED_ON_A_CLUSTER = ("lightgbm", "baseline")


def check_trainable(settings: Settings, model: str, tuning: bool) -> None:
    """Before any data is read: what a cluster cannot train is one line."""
    if settings.dask is None:
        return
    if model not in TRAINED_ON_A_CLUSTER:
        raise ClusterError(f"model {model!r} trains in-process only; on a Dask cluster: "
                           f"{' or '.join(TRAINED_ON_A_CLUSTER)} (or unset TRIPCAST_DASK / drop --dask)")
    if tuning:
        raise ClusterError("tuning (--trials, --timeout) runs in-process only: drop --dask to tune")


def _require_dask() -> None:
    try:
        import dask.dataframe  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ClusterError(f"TRIPCAST_DASK needs Dask, which is not installed ({exc.name}): "
                           "pip install 'tripcast[dask]'") from None


def _tripcast_version() -> str:
    return version("tripcast")


@contextmanager
def connect(target: DaskTarget, settings: Settings) -> Iterator[Client]:
    """A client of the cluster ``target`` names, checked: it answers, it has workers, they run this tripcast.
    A worker lost for good while work ran (killed, out of memory) ends the work with one line."""
    _require_dask()
    from distributed import Client, LocalCluster
    from distributed.scheduler import KilledWorker

    if not logging.getLogger().isEnabledFor(logging.INFO):  # Dask's own lines (workers lost, shuffles): -v
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
    cluster = None
    if target.address is None:
        import dask

        # No spilling and no pausing: lightgbm.dask's training holds sockets a worker cannot spill, and a paused
        # worker stalls every other one in the collective training (seen: two workers idle for minutes). A worker
        # past its limit is restarted instead, and the work fails in one line if it happens again.
        dask.config.set({"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
                         "distributed.worker.memory.pause": False})
        memory = f"{settings.dask_worker_memory_gb}GB" if settings.dask_worker_memory_gb else "auto"
        with warnings.catch_warnings():  # "Port 8787 is already in use" of a dashboard it does not start
            warnings.simplefilter("ignore", UserWarning)
            cluster = LocalCluster(n_workers=target.workers, threads_per_worker=1, processes=True,
                                   memory_limit=memory, dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
        client.run(_quiet_stdout)  # the command's output is its own (LightGBM's network setup prints there)
    else:
        try:
            client = Client(target.address, timeout=settings.dask_connect_seconds)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"no Dask scheduler answers at {target.address} after "
                               f"{settings.dask_connect_seconds:g} s ({type(exc).__name__}); start one, or unset "
                               "TRIPCAST_DASK to work in-process") from None
    try:
        _check_workers(client, str(target), settings)
        yield client
    except (KilledWorker, WorkerLost) as exc:
        task = exc.task if isinstance(exc, WorkerLost) else key_name(exc.args[0]) if exc.args else "a task"
        raise ClusterError(f"Dask workers of {target} died running {task} (out of memory? give each more: "
                           "TRIPCAST_DASK_WORKER_MEMORY_GB for a local cluster, or add workers); no unfinished "
                           "output was written") from None
    finally:
        with suppress(Exception):
            client.close()
        if cluster is not None:
            with suppress(Exception):
                cluster.close()


@contextmanager
def cluster_of(settings: Settings) -> Iterator[Client | None]:
    """``connect`` to TRIPCAST_DASK's cluster, or None (in-process) when it is unset: Dask is not even imported."""
    if settings.dask is None:
        yield None
        return
    with connect(settings.dask, settings) as client:
        yield client


def mapper(client: Client) -> Callable[[Callable, Iterable], list]:
    """``map`` on the cluster: each item a task, results in order (monitoring's window slices)."""
    def run(function: Callable, items: Iterable) -> list:
        return client.gather(client.map(function, list(items), pure=False))
    return run


def _quiet_stdout() -> None:
    import os

    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)


def key_name(key: object) -> str:
    """A task's name without Dask's token: ('score_piece-3f2a-…', 4) -> 'score_piece'."""
    return str(key[0] if isinstance(key, tuple) else key).split("-", 1)[0]


def _check_workers(client: Client, name: str, settings: Settings) -> None:
    try:
        client.wait_for_workers(1, timeout=settings.dask_connect_seconds)
    except TimeoutError:
        raise ClusterError(f"the Dask scheduler at {name} has no workers after "
                           f"{settings.dask_connect_seconds:g} s") from None
    ours = _tripcast_version()
    found = client.run(_tripcast_version, on_error="return")
    wrong = {worker: answer for worker, answer in found.items() if answer != ours}
    if wrong:
        worker, answer = next(iter(wrong.items()))
        missing = isinstance(answer, PackageNotFoundError | ImportError) or (
            isinstance(answer, BaseException) and "No module named 'tripcast" in str(answer))
        what = ("cannot import tripcast" if missing
                else f"fails to run tripcast ({type(answer).__name__}: {answer})" if isinstance(answer, BaseException)
                else f"runs tripcast {answer}, this is {ours}")
        raise ClusterError(f"{len(wrong)} of {len(found)} Dask workers of {name} cannot do tripcast's work: "
                           f"{worker} {what}; install tripcast[dask] (the same version) where the workers run")
