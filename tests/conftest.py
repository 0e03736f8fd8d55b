"""Shared fixtures: the real TLC files through tripcast's mirror setting, an isolated TRIPCAST_HOME per test,
and one Prefect test server for the whole session (it takes seconds to start)."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Prefect reads its home and telemetry switch at import: set them before any test module imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tripcast-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from tripcast.config import Settings  # noqa: E402


def eventually(check: Callable[[], bool], timeout: float = 15, ignoring: tuple[type[Exception], ...] = ()) -> None:
    """Poll ``check`` until it holds (an ``ignoring`` error counts as not yet); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ignoring:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s")


@pytest.fixture(scope="session")
def tlc_mirror() -> Path:
    mirror = Path(os.environ.get("TRIPCAST_TLC_MIRROR") or REPO.parent / "shared" / "data" / "tlc")
    if not (mirror / "green_tripdata_2021-01.parquet").is_file():
        pytest.fail(f"the tests read real TLC files: set TRIPCAST_TLC_MIRROR to a folder holding them (tried {mirror})")
    return mirror


@pytest.fixture
def settings(tmp_path: Path, tlc_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for one test, also exported as TRIPCAST_* so flows (which read the environment) agree."""
    home = tmp_path / "home"
    for key in list(os.environ):
        if key.startswith("TRIPCAST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TRIPCAST_HOME", str(home))
    monkeypatch.setenv("TRIPCAST_TLC_MIRROR", str(tlc_mirror))
    monkeypatch.setenv("TRIPCAST_PROGRESS", "false")
    monkeypatch.setenv("TRIPCAST_CONFIG", str(tmp_path / "absent.toml"))
    return Settings(home=home, tlc_mirror=str(tlc_mirror), progress=False)


@contextmanager
def module_environment(home: Path, tlc_mirror: Path, **extra: str) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings for a module's tests, exported as TRIPCAST_* (its flows and API processes read the environment),
    with fast polls and flushes; ``extra``: more TRIPCAST_* variables. Restored afterwards."""
    env = {"TRIPCAST_HOME": str(home), "TRIPCAST_TLC_MIRROR": str(tlc_mirror), "TRIPCAST_PROGRESS": "false",
           "TRIPCAST_CONFIG": str(home / "absent.toml"), "TRIPCAST_POLL_SECONDS": "0.3",
           "TRIPCAST_LOG_FLUSH_SECONDS": "0.1"} | extra
    patch = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("TRIPCAST_")]:
        patch.delenv(key)
    for key, value in env.items():
        patch.setenv(key, value)
    try:
        yield Settings(home=home, tlc_mirror=str(tlc_mirror), progress=False,
                       admin_token=env.get("TRIPCAST_ADMIN_TOKEN")), env
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server (SQLite) for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def chromium() -> list[str]:
    """Debian's headless Chromium with the flags the browser tests use. Missing, the browser tests are skipped
    on a developer's machine (`make test` installs it where it can) and fail in CI, where `.ci/run` installs it."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "the browser tests need Chromium: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs it)")
        pytest.skip(message)
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--virtual-time-budget=15000"]


POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[Callable[[], str]]:
    """Make fresh databases on the local PostgreSQL (dropped after the test); returns their URLs."""
    import sqlalchemy as sa

    admin = sa.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"tripcast_test_{uuid.uuid4().hex[:10]}"
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.OperationalError as exc:
            pytest.fail(f"the production-profile tests need PostgreSQL on 127.0.0.1:5432 ({exc.orig})")
        made.append(name)
        return f"{POSTGRES}/{name}"

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
