"""The per-window Evidently HTML reports: written slim, kept under a retention setting.

Evidently embeds its 3.5 MB JavaScript bundle and its icon font in every report (~3.9 MB a window, 53 MB for
one rehearsal); here each report refers to one shared copy beside it instead (~0.3 MB a window). The newest
``TRIPCAST_REPORTS_KEEP`` reports are kept; older ones are deleted and their links cleared in the store.
"""

from __future__ import annotations

import base64
import logging
import shutil
from functools import cache
from pathlib import Path

import evidently
from sqlalchemy import update
from sqlalchemy.engine import Engine

from tripcast.files import atomic_path
from tripcast.store import window_metrics

log = logging.getLogger(__name__)
STATIC = Path(evidently.__file__).parent / "nbextension" / "static"
SCRIPT = f"evidently-{evidently.__version__}.js"
FONT = f"evidently-{evidently.__version__}-icons.woff2"


@cache
def _embedded() -> tuple[str, str]:
    """What Evidently inlines in a report: its script element and its font's data URL."""
    script = (STATIC / "index.js").read_text(encoding="utf-8")
    font = base64.b64encode((STATIC / "material-ui-icons.woff2").read_bytes()).decode()
    return f"<script>{script}</script>", f"url(data:font/ttf;base64,{font}) format('woff2');"


def save(snapshot, path: Path) -> None:
    """The snapshot's HTML report at ``path``, pointing at the shared script and font beside it (copied there
    once). If Evidently's page no longer embeds them as expected, the report is saved whole, as Evidently
    writes it."""
    page = snapshot.get_html_str(as_iframe=False)
    script, font = _embedded()
    if script in page and font in page:
        for name, source in ((SCRIPT, "index.js"), (FONT, "material-ui-icons.woff2")):
            if not (path.parent / name).is_file():
                with atomic_path(path.parent / name) as tmp:
                    shutil.copyfile(STATIC / source, tmp)
        page = page.replace(script, f'<script src="{SCRIPT}"></script>').replace(font, f"url({FONT});")
    else:
        log.debug("Evidently's report page changed: %s is saved self-contained", path.name)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def prune(engine: Engine, folder: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest reports (by the window they measure; their names sort by it) and
    clear the store's links to them; returns the names deleted."""
    reports = sorted(folder.glob("*.html"), key=lambda p: (p.name.partition("-")[2], p.stat().st_mtime))
    gone = reports[:max(0, len(reports) - keep)]
    if not gone:
        return []
    names = [p.name for p in gone]
    with engine.begin() as conn:  # links first: a dashboard never links to a deleted report
        conn.execute(update(window_metrics).where(window_metrics.c.report.in_(names)).values(report=None))
    for report in gone:
        report.unlink(missing_ok=True)
    log.info("deleted %d old report(s) (TRIPCAST_REPORTS_KEEP=%d)", len(gone), keep)
    return names
