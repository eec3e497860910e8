"""Tiny wheelhouses for tests: real wheels (written as zip files, no build), hash-pinned
requirement files and a manifest, exactly as `make artifacts` lays them out.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path

from fedsky.shared.artifacts import (
    MANIFEST_FILE,
    Manifest,
    Pin,
    Role,
    build_manifest,
    render_requirements,
    requirements_file,
    sha256_file,
)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    directory: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    scripts: Sequence[str] = (),
) -> Path:
    """A pure-Python wheel of `name` with one module (`name/__init__.py` says its version);
    each of `scripts` is a console script that prints the version."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {req}" for req in requires]
    extras = sorted({r.split('extra == "')[1].rstrip('"') for r in requires if "extra ==" in r})
    metadata += [f"Provides-Extra: {extra}" for extra in extras]
    module = f'VERSION = "{version}"\n'
    if scripts:
        module += "\n\ndef main() -> None:\n    print(VERSION)\n"
    files = {
        f"{dist}/__init__.py": module.encode(),
        f"{info}/METADATA": ("\n".join(metadata) + "\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fedsky-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if scripts:
        entry_points = "".join(f"{script} = {dist}:main\n" for script in scripts)
        files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{entry_points}".encode()
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return path


def write_wheelhouse(
    directory: Path, role: Role = "aggregator", *, scripts: Sequence[str] = ()
) -> Manifest:
    """`fedsky` (whose `role` extra needs `fedsky-tinydep`) and that dependency, pinned for `role`;
    `scripts`: console scripts of the fedsky wheel (e.g. `flower-supernode`)."""
    directory.mkdir(parents=True, exist_ok=True)
    fedsky = make_wheel(
        directory,
        "fedsky",
        "0.1.0",
        requires=[f'fedsky-tinydep==1.0; extra == "{role}"'],
        scripts=scripts,
    )
    dep = make_wheel(directory, "fedsky-tinydep", "1.0")
    pins = [
        Pin("fedsky", "0.1.0", fedsky.name, sha256_file(fedsky), extras=(role,)),
        Pin("fedsky-tinydep", "1.0", dep.name, sha256_file(dep)),
    ]
    (directory / requirements_file(role)).write_text(render_requirements(role, pins))
    manifest = build_manifest(
        directory=directory,
        fedsky_version="0.1.0",
        python="cp311",
        roles_of={fedsky.name: [role], dep.name: [role], requirements_file(role): [role]},
    )
    (directory / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def isolated_pip_env() -> dict[str, str]:
    """The environment minus every PIP_* variable, with no pip configuration file read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip_install(
    pip: Path | str, wheelhouse: Path, role: Role = "aggregator", *extra: str
) -> subprocess.CompletedProcess[str]:
    """`pip install --no-index --find-links WHEELHOUSE --require-hashes -r requirements-ROLE.txt`."""
    return subprocess.run(
        [
            str(pip),
            "install",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            "--require-hashes",
            "-r",
            str(wheelhouse / requirements_file(role)),
            *extra,
        ],
        env=isolated_pip_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
