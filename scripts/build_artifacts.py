"""Build fedsky's pinned release artifacts: `make artifacts`.

Writes `dist/wheelhouse/` (or `--out`):

- fedsky's own wheel, built from this checkout (`pip wheel --no-deps`, from a clean copy of the
  sources so that nothing stale under `build/` gets in);
- every dependency of each role (`agent`, `client`, `aggregator`, `controller`: fedsky's extra
  of that name) as a wheel, fetched or built by `pip wheel` with this machine's pip settings;
  the client's torch must be the CPU build (`torch==...+cpu`), or the build fails;
- `requirements-<role>.txt`: each distribution of the role pinned by version and SHA-256;
- `manifest.json`: every file, its digest, size and roles (`fedsky.shared.artifacts`).

Each role's set is resolved again from the wheelhouse alone (`--no-index`, pip's own
configuration files and environment ignored), which proves it complete, and then checked with
`--require-hashes` against its requirement file. The wheels are for this machine's Python and
platform (CPython 3.11 on x86-64 Linux here, as on the Debian 12 images the aggregators boot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fedsky.shared.artifacts import (
    MANIFEST_FILE,
    ROLES,
    ArtifactError,
    Pin,
    Role,
    build_manifest,
    normalize_name,
    parse_wheel_name,
    render_requirements,
    requirements_file,
    sha256_file,
    verify_directory,
)

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "controller", "agent", "shared")


def _pip(
    *args: str, isolated: bool = False, quiet: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip. `isolated`: no config files, no PIP_* variables, no index."""
    env = dict(os.environ)
    if isolated:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    command = [sys.executable, "-m", "pip", *args]
    if quiet:
        command.insert(4, "--quiet")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArtifactError(f"pip {args[0]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def build_fedsky_wheel(out: Path) -> Path:
    """fedsky's wheel from a clean copy of the checkout's sources, into `out`."""
    with tempfile.TemporaryDirectory(prefix="fedsky-src-") as tmp:
        src = Path(tmp, "fedsky")
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            else:
                shutil.copy2(path, src / name)
        _pip("wheel", "--no-deps", "-w", str(out), str(src))
    (wheel,) = out.glob("fedsky-*.whl")
    return wheel


def fetch_role(fedsky_wheel: Path, role: Role, out: Path) -> None:
    """Every wheel `fedsky[role]` needs, into `out` (downloaded, or built from source if need be)."""
    _pip("wheel", "--prefer-binary", "-w", str(out), f"{fedsky_wheel}[{role}]")


def resolve_role(fedsky_wheel: Path, role: Role, out: Path) -> list[dict[str, Any]]:
    """What `fedsky[role]` installs, resolved from `out` alone; ArtifactError if incomplete."""
    with tempfile.TemporaryDirectory(prefix="fedsky-report-") as tmp:
        report = Path(tmp, "report.json")
        _pip(
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-index",
            "--find-links",
            str(out),
            "--report",
            str(report),
            f"{fedsky_wheel}[{role}]",
            isolated=True,
        )
        installs: list[dict[str, Any]] = json.loads(report.read_text())["install"]
    return installs


def pins_for(installs: list[dict[str, Any]], role: Role, out: Path) -> list[Pin]:
    pins = []
    for item in installs:
        url = item["download_info"]["url"]
        file = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if not file.endswith(".whl") or not (out / file).is_file():
            raise ArtifactError(f"role {role}: {url} is not a wheel of the wheelhouse")
        meta = item["metadata"]
        stated = parse_wheel_name(file)
        if stated.name != normalize_name(meta["name"]):
            raise ArtifactError(f"role {role}: {file} holds {meta['name']}")
        pin = Pin(
            name=meta["name"],
            version=meta["version"],
            file=file,
            sha256=sha256_file(out / file),
            extras=(role,) if stated.name == "fedsky" else (),
        )
        pins.append(pin)
    pins.sort(key=lambda p: (normalize_name(p.name) != "fedsky", normalize_name(p.name)))
    if role == "client":
        _check_cpu_torch(pins)
    return pins


def _check_cpu_torch(pins: Sequence[Pin]) -> None:
    torch = [p for p in pins if normalize_name(p.name) == "torch"]
    cuda = [p.name for p in pins if normalize_name(p.name).startswith("nvidia-")]
    if not torch or "+cpu" not in torch[0].version or cuda:
        raise ArtifactError(
            f"the client's torch must be the CPU build (torch==X+cpu, no nvidia packages); "
            f"resolved {[p.file for p in torch]} with {cuda or 'no'} CUDA packages"
        )


def check_install(out: Path, role: Role) -> None:
    """pip's own check: the role's requirement file installs from `out` alone, every digest verified."""
    _pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-index",
        "--find-links",
        str(out),
        "--require-hashes",
        "-r",
        str(out / requirements_file(role)),
        isolated=True,
    )


def build(out: Path, roles: Sequence[Role]) -> dict[str, Any]:
    """Build the wheelhouse in `out` for `roles`; returns what it measured."""
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="fedsky-wheel-") as tmp:
        fedsky_wheel = shutil.copy2(build_fedsky_wheel(Path(tmp)), out)
    fedsky_wheel = Path(fedsky_wheel)
    version = parse_wheel_name(fedsky_wheel.name).version
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    roles_of: dict[str, set[Role]] = {}
    measured: dict[str, Any] = {"roles": {}}
    for role in roles:
        t0 = time.monotonic()
        fetch_role(fedsky_wheel, role, out)
        pins = pins_for(resolve_role(fedsky_wheel, role, out), role, out)
        header = f"# fedsky {version}, {python}; built by `make artifacts`"
        (out / requirements_file(role)).write_text(render_requirements(role, pins, header=header))
        check_install(out, role)
        roles_of[requirements_file(role)] = {role}
        for pin in pins:
            roles_of.setdefault(pin.file, set()).add(role)
        measured["roles"][role] = {
            "files": len(pins),
            "bytes": sum((out / p.file).stat().st_size for p in pins),
            "seconds": round(time.monotonic() - t0, 1),
        }
    # Wheels no role installs (pip wheel may leave some) are not part of the release.
    for path in out.iterdir():
        if path.name not in roles_of:
            path.unlink()
    manifest = build_manifest(
        directory=out, fedsky_version=version, python=python, roles_of=dict(roles_of)
    )
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    verify_directory(out)
    measured["files"] = len(manifest.files)
    measured["bytes"] = sum(entry.size for entry in manifest.files)
    measured["seconds"] = round(time.monotonic() - started, 1)
    return measured


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "wheelhouse")
    parser.add_argument(
        "--role", action="append", choices=ROLES, help="build only this role (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    roles: list[Role] = [r for r in ROLES if r in (args.role or ROLES)]
    missing = [r for r in roles if r not in extras]
    if missing:
        print(f"pyproject.toml has no extra for {missing}", file=sys.stderr)
        return 2
    try:
        measured = build(args.out, roles)
    except ArtifactError as exc:
        print(f"make artifacts: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(measured))
    else:
        print(f"{'role':<12}{'files':>6}{'MB':>10}{'s':>8}")
        for role, row in measured["roles"].items():
            print(f"{role:<12}{row['files']:>6}{row['bytes'] / 1e6:>10.1f}{row['seconds']:>8.1f}")
        print(
            f"wheelhouse {args.out}: {measured['files']} files, {measured['bytes'] / 1e6:.1f} MB, "
            f"{measured['seconds']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
