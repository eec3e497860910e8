"""What a hospital can do to a job's aggregator with Flower's own CLI: the commands a hostile
hospital (or anyone holding fedsky's CA certificate) would try against the SuperLink's Control
API, run where the hospital runs (its testbed host) with nothing but the CA certificate.

Each attempt is recorded with its exit code and the CLI's own words; `refused` means the CLI
failed with the front's 403 and, for `flwr run`, that none of the foreign app's code ran on
the machine (a marker file its ServerApp would write is absent).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedsky.shared.supernode import generate_node_key

CONNECTION = "target"
_TIMEOUT_S = 120.0


def _foreign_app(directory: Path, marker: Path) -> Path:
    """A Flower app that is not fedsky's: its ServerApp and ClientApp write `marker` on import."""
    source = Path(__file__).resolve().parents[2] / "shared" / "flower" / "pyproject.toml"
    app = directory / "foreign-app"
    app.mkdir(parents=True, exist_ok=True)
    text = source.read_text().replace('name = "fedsky-app"', 'name = "foreign-app"')
    text = text.replace("fedsky.shared.flower.server_app:app", "foreign_app:app")
    text = text.replace("fedsky.shared.flower.client_app:app", "foreign_app:app")
    (app / "pyproject.toml").write_text(text)
    (app / "foreign_app.py").write_text(
        f"open({str(marker)!r}, 'w').write('foreign code ran')\napp = None\n"
    )
    return app


def probe_control(
    *, address: str, ca_file: Path, work: Path, netns: str | None = None
) -> dict[str, Any]:
    """Try `flwr ls`, `flwr run` (a foreign app), `flwr stop`, `flwr supernode register` against
    the SuperLink at `address`, from `netns` (None: this namespace)."""
    work.mkdir(parents=True, exist_ok=True)
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca_file))}\n"
    )
    marker = work / "foreign-code-ran"
    app = _foreign_app(work, marker)
    flwr = str(Path(sys.executable).parent / "flwr")
    attempts = {
        "flwr ls": [flwr, "ls", CONNECTION],
        "flwr run": [flwr, "run", str(app), CONNECTION],
        "flwr stop": [flwr, "stop", "1", CONNECTION],
        "flwr supernode register": [
            flwr,
            "supernode",
            "register",
            str(generate_node_key(work / "own-node", "node").public_key),
            CONNECTION,
        ],
    }
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    prefix = ["ip", "netns", "exec", netns] if netns else []
    results = []
    for label, argv in attempts.items():
        try:
            done = subprocess.run(
                prefix + argv,
                capture_output=True,
                text=True,
                env=env,
                cwd=work,
                timeout=_TIMEOUT_S,
                check=False,
            )
            code, output = done.returncode, (done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            code, output = None, f"no answer within {_TIMEOUT_S:g} s"
        # The CLI's words without its box drawing; Flower's "Client error '403 Forbidden'".
        said = " ".join(re.sub(r"[^\x20-\x7e]+", " ", output).split())
        results.append(
            {
                "command": label,
                "exit_code": code,
                "refused": code not in (0, None) and "403" in said,
                "said": said[-300:],
            }
        )
    return {"from": netns, "attempts": results, "foreign_code_ran": marker.exists()}


def all_refused(probe: dict[str, Any]) -> bool:
    return not probe["foreign_code_ran"] and all(a["refused"] for a in probe["attempts"])
