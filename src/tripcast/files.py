"""Files written whole or not at all: readers (and a crash) never see half a file."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` if the block succeeds,
    removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are 0600 whatever the umask; here the writer creates the file with the usual mode.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    try:
        yield tmp
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace(source: Path, path: Path) -> None:
    """``os.replace``, also of a folder by a file or a file (or folder) by a folder: what was there is moved aside
    first and removed after, so ``path`` is always whole (batch scoring writes a file in-process, a folder of
    parts on a cluster)."""
    if not (path.is_dir() or (source.is_dir() and path.exists())):
        os.replace(source, path)
        return
    earlier = path.with_name(f".{path.name}.replaced-{secrets.token_hex(4)}")
    os.replace(path, earlier)
    os.replace(source, path)
    if earlier.is_dir():
        shutil.rmtree(earlier)
    else:
        earlier.unlink()
