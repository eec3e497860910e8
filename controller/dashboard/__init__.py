"""The operator's web dashboard: static pages (controller/dashboard/static) over the API.

The pages are plain HTML, CSS and JavaScript modules that call the same `/v1` routes as `fedctl`
(with a browser session instead of a bearer token) and follow `/v1/events` for live updates.
Their one library, uPlot, comes from `web/package-lock.json` (pinned with integrity hashes) and is
copied into `static/vendor/` by `scripts/build_dashboard.py` when fedsky is installed, so the
built files ship in the controller's package and the user's side needs no build step.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_DIR = STATIC_DIR / "vendor"
VENDOR_FILES = ("uPlot.iife.min.js", "uPlot.min.css")
