"""scripts/plots_offline.py: DVC's page template with the npm packages' builds inside it (the
charts drawn by Chromium from it: test_pipeline_dvc's offline-plots test)."""
from __future__ import annotations

import base64
import json
import re
import sys

import pytest

from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import plots_offline  # noqa: E402

NODE_MODULES, LOCK = PROJECT_ROOT / "node_modules", PROJECT_ROOT / "package-lock.json"


def test_template_holds_the_pinned_builds_and_dvcs_placeholders():
    page = plots_offline.build_template(node_modules=NODE_MODULES, lock=LOCK)
    assert page.count("{plot_divs}") == page.count("{refresh_tag}") == 1
    assert "{scripts}" not in page  # so DVC never adds its CDN tags
    sources = re.findall(r'<script src="([^"]+)"', page)
    assert len(sources) == 3 and all(s.startswith("data:text/javascript;base64,") for s in sources)
    for src, (name, build) in zip(sources, plots_offline.LIBRARIES.items()):
        assert base64.b64decode(src.split(",", 1)[1]) == (NODE_MODULES / name / build).read_bytes()
    pinned = json.loads(LOCK.read_text())["packages"]
    assert f"vega-lite {pinned['node_modules/vega-lite']['version']}" in page


def test_an_install_that_is_not_the_lockfiles_is_refused(tmp_path):
    lock = json.loads(LOCK.read_text())
    lock["packages"]["node_modules/vega"]["version"] = "0.0.1"
    (tmp_path / "package-lock.json").write_text(json.dumps(lock))
    with pytest.raises(ValueError, match=r"vega .* package-lock.json pins 0.0.1: run `npm ci`"):
        plots_offline.build_template(node_modules=NODE_MODULES, lock=tmp_path / "package-lock.json")
    with pytest.raises(FileNotFoundError, match="run `npm ci`"):
        plots_offline.build_template(node_modules=tmp_path / "node_modules", lock=LOCK)
