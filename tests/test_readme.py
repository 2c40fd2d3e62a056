"""README is the front door: short, its results table the one scripts/results_table.py makes from the
committed eval/metrics.json (so it cannot go stale), and every file, script and command the README
and docs/ name exists."""
from __future__ import annotations

import json
import re
import sys

from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))

from results_table import README_END, README_START, readme_with_table, table  # noqa: E402

README = PROJECT_ROOT / "README.md"
DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))


def test_readme_is_short_and_links_every_doc():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    linked = set(re.findall(r"\]\((docs/[^)]+\.md)\)", text))
    assert linked == {f"docs/{p.name}" for p in DOCS} and DOCS


def test_the_results_table_is_the_one_made_from_the_committed_metrics():
    text = README.read_text()
    made = table(json.loads((PROJECT_ROOT / "eval" / "metrics.json").read_text()), headline=True)
    assert readme_with_table(text, made) == text, "run: python scripts/results_table.py --headline --readme README.md"
    assert README_START in text and README_END in text and "| gallery rank-1, probes mask 1.0 |" in made


def test_every_script_module_and_doc_named_exists():
    missing = []
    for page in [README, *DOCS]:
        text = page.read_text()
        for path in set(re.findall(r"\b((?:scripts|benchmarks|stages)/[A-Za-z0-9_]+\.(?:py|sh))\b", text)):
            if not (PROJECT_ROOT / path).is_file():
                missing.append(f"{page.name}: {path}")
        for module in set(re.findall(r"python -m (pipeline(?:\.[a-z_]+)+|stages\.[a-z_]+)", text)):
            if not (PROJECT_ROOT / (module.replace(".", "/") + ".py")).is_file():
                missing.append(f"{page.name}: {module}")
        for target in set(re.findall(r"\]\(([a-z_-]+\.md)\)", text)):
            if not (page.parent / target).is_file():
                missing.append(f"{page.name}: link {target}")
    assert not missing, missing
