"""Puts the dashboard's front-end library into the controller's package.

uPlot is pinned in web/package-lock.json with its integrity hash; `npm ci` installs exactly that
(and refuses a tarball whose hash differs), then its built files are copied into
controller/dashboard/static/vendor/, which ships in the controller's package: people who install
fedsky need no build step. Skipped when the copied files are newer than the lockfile.

    python scripts/build_dashboard.py [--force]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
LOCKFILE = WEB / "package-lock.json"
VENDOR = REPO / "controller" / "dashboard" / "static" / "vendor"
# (file in node_modules, name in vendor/)
FILES = (
    ("uplot/dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
    ("uplot/dist/uPlot.min.css", "uPlot.min.css"),
    ("uplot/LICENSE", "uPlot.LICENSE"),
)


def up_to_date() -> bool:
    built = [VENDOR / name for _, name in FILES]
    return (
        all(p.exists() for p in built)
        and min(p.stat().st_mtime for p in built) >= LOCKFILE.stat().st_mtime
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install and copy even if up to date")
    args = parser.parse_args(argv)
    if not args.force and up_to_date():
        return 0
    npm = shutil.which("npm")
    if npm is None:
        print("build_dashboard: npm is missing (apt install npm)", file=sys.stderr)
        return 1
    print("fedsky: installing the dashboard's front-end files (npm ci, web/package-lock.json)")
    done = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=WEB,
        check=False,
    )
    if done.returncode != 0:
        print(f"build_dashboard: npm ci exited {done.returncode}", file=sys.stderr)
        return 1
    VENDOR.mkdir(parents=True, exist_ok=True)
    for source, name in FILES:
        shutil.copyfile(WEB / "node_modules" / source, VENDOR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
