"""Prefect flows that compose the core: train (load -> validate -> features -> train -> register and judge),
evaluate, score (batch), monitor and retrain, and the quick start."""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

from tripcast import interrupts
from tripcast.errors import DataError
from tripcast.files import atomic_path

_progress: list[Callable[[str], None]] = []


def report_progress_to(sink: Callable[[str], None]) -> None:
    """Where flows say what they are doing, step by step (a command's terminal; nowhere by default)."""
    _progress[:] = [sink]


def say(message: str) -> None:
    for sink in _progress:
        sink(message)


def retry_unless_data_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry the unexpected (a full disk, a killed process), not data errors. A
    missing month or a corrupt file will not mend, and the data layer already retries the network; nor Dask
    workers that died running a task (distributed already tried it on several; out of memory, they die again)."""
    scheduler = sys.modules.get("distributed.scheduler")  # loaded if a cluster ran the task
    return not isinstance(state.data, DataError) and not (scheduler and isinstance(state.data, scheduler.KilledWorker))


def prepare_local_prefect(home: Path) -> None:
    """Without a Prefect server (PREFECT_API_URL), each run starts Prefect's local one on the database in
    ``home``: migrate that database once, under a file lock, first. Runs sharing a home raced in their
    migrations ("Online migration expected to match one row"), and the loser still exited 0."""
    marker = home / f".tripcast-migrated-{version('prefect')}"
    if marker.exists() and (home / "prefect.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".tripcast-migrate.lock", timeout=600):
        if marker.exists() and (home / "prefect.db").exists():
            return
        from prefect.server.database import provide_database_interface
        from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

        database = home / "prefect.db"
        if database.exists() or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
            asyncio.run(provide_database_interface().create_db())  # Prefect's own upgrade of its database
        else:  # migrated beside its path and renamed into place: a Ctrl-C must not leave half a database
            with atomic_path(database) as tmp, temporary_settings(
                    updates={PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{tmp}"}):
                asyncio.run(provide_database_interface().create_db())
        marker.touch()


def start_local_prefect(home: Path, say: Callable[[str], None] = lambda _: None) -> None:
    """Without a Prefect server (PREFECT_API_URL): migrate the local database once (``prepare_local_prefect``),
    then start Prefect's local server for this command in a session of its own, and point Prefect at it until
    the command ends. Prefect's own ephemeral server shares the terminal's process group: Ctrl-C killed it first,
    and the interrupted run then spent minutes retrying to report its end to it (141 s, a 120-line traceback)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    new = not (home / "prefect.db").exists()
    say("starting Prefect's local server" + (" (making its database: a new home, ~10 s)" if new else ""))
    # A port the system picks (Prefect draws one of a thousand at random: concurrent commands drew the same, and
    # one then ran its flows on another's server, refused once that command ended). Its address is in the
    # environment before Prefect is imported, so that every settings context Prefect makes, in every thread,
    # has it: a thread without it started an ephemeral server of its own (in the terminal's group, so Ctrl-C
    # killed it, and the crash report to it was refused and retried for a minute).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    prepare_local_prefect(home)
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class OwnSession(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect's command (SubprocessASGIServer._run_uvicorn_command), started as our own child.
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env=os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                                  "PREFECT__SERVER_FINAL": "1"}, preexec_fn=interrupts.owned_child)

        def stop(self) -> None:
            # Its runs' states are committed as they change: waiting out open keep-alive connections (Prefect
            # allows 5 s) only delays the exit of an interrupted command.
            if self.server_process is not None and self.server_process.poll() is None:
                self.server_process.terminate()
                try:
                    self.server_process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    self.server_process.kill()
            super().stop()

    server = OwnSession(port)
    server.start()
    atexit.register(server.stop)
    temporary_settings(updates={PREFECT_API_URL: server.api_url}).__enter__()  # if Prefect was imported earlier
