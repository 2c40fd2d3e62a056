"""`dvc plots show` without a network: an HTML template with vega, vega-lite and vega-embed inside it.

DVC's own page loads the three libraries from a CDN, so offline its vega charts stay blank. This
writes a template for `dvc plots show --html-template` whose scripts are the npm packages' builds,
embedded as data: URIs (nothing to fetch, nothing to escape). The packages come from the npm
registry once (`npm ci`: exact versions and integrity hashes from package-lock.json) and are read
from node_modules/ after that:

    make plots                                     # npm ci once, this script, dvc plots show
    python scripts/plots_offline.py --out build/plots_template.html
    dvc plots show --html-template build/plots_template.html      # or: dvc plots diff ... likewise

Charts are drawn as SVG (vega-embed's canvas default leaves nothing to read in the page's DOM).
"""
from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# package -> its UMD build, in load order (vega-lite needs vega; vega-embed needs both)
LIBRARIES = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js",
             "vega-embed": "build/vega-embed.min.js"}
PLACEHOLDERS = ("{refresh_tag}", "{plot_divs}")  # filled by DVC (dvc_render.html); {scripts} is left out
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- offline: {versions}, from node_modules (scripts/plots_offline.py) -->
{libraries}
    <script>
        // DVC's chart divs call vegaEmbed(id, spec): draw them as SVG
        const embedWithVega = vegaEmbed;
        window.vegaEmbed = (el, spec, opts) => embedWithVega(el, spec, Object.assign({renderer: "svg"}, opts));
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def lockfile_versions(lock: Path) -> dict[str, str]:
    """The versions package-lock.json pins for the three libraries."""
    packages = json.loads(lock.read_text())["packages"]
    return {name: packages[f"node_modules/{name}"]["version"] for name in LIBRARIES}


def build_template(node_modules: Path, lock: Path) -> str:
    """The template's text; refuses a node_modules/ missing a library or holding another version
    than package-lock.json pins (an install that skipped `npm ci`)."""
    pinned = lockfile_versions(lock)
    tags, versions = [], []
    for name, build in LIBRARIES.items():
        package = node_modules / name
        if not (package / build).is_file():
            raise FileNotFoundError(f"{package / build} is missing: run `npm ci` in the project root "
                                    "(it installs the versions package-lock.json pins)")
        found = json.loads((package / "package.json").read_text())["version"]
        if found != pinned[name]:
            raise ValueError(f"{name} {found} in {node_modules}, package-lock.json pins {pinned[name]}: run `npm ci`")
        data = base64.b64encode((package / build).read_bytes()).decode("ascii")
        tags.append(f'    <script src="data:text/javascript;base64,{data}"></script>')
        versions.append(f"{name} {found}")
    page = PAGE.replace("{versions}", ", ".join(versions)).replace("{libraries}", "\n".join(tags))
    assert all(page.count(p) == 1 for p in PLACEHOLDERS), "a placeholder DVC fills appears twice"
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node-modules", type=Path, default=PROJECT_ROOT / "node_modules")
    ap.add_argument("--lock", type=Path, default=PROJECT_ROOT / "package-lock.json")
    ap.add_argument("--out", type=Path, required=True, help="the template to write")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build_template(node_modules=args.node_modules, lock=args.lock), encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
