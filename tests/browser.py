"""A page as headless Chromium draws it, with no network: the DOM after its scripts have run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# as this machine's own probe starts it (flags that stop Chromium's background connections), and
# every host name unresolvable, so a page that needs a CDN draws nothing
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium: install Debian's chromium (apt-get install chromium; .ci/run does) "
                    "or set CHROMIUM to a Chromium binary")
    return path


def rendered_dom(page: Path, wait_ms: int = 20000) -> str:
    """The page's DOM once its scripts are done (Chromium's virtual time runs them to completion)."""
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                            "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "<html" in p.stdout, p.stderr[-3000:]
    return p.stdout


def drawn_vega_charts(page: Path, dom: str) -> dict[str, int]:
    """Chart div id (from the page DVC wrote) -> the data marks vega drew in it as SVG (0: blank)."""
    ids = re.findall(r'<div id = "([^"]+)">\s*<script', page.read_text(encoding="utf-8"))
    starts = [dom.find(f'<div id="{chart}"') for chart in ids]
    assert -1 not in starts, "a chart div is missing from the drawn page"
    ends = starts[1:] + [len(dom)]
    return {chart: dom[a:b].count('role="graphics-symbol"') for chart, a, b in zip(ids, starts, ends)}
