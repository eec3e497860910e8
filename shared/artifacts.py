"""Pinned release artifacts: the wheelhouse, its manifest and the hash-pinned requirement files.

`make artifacts` (`scripts/build_artifacts.py`) writes a directory of wheels (fedsky itself and
every dependency of each role), one `requirements-<role>.txt` per role and `manifest.json`:

```json
{"format": 1, "fedsky_version": "0.1.0", "python": "cp311",
 "files": [{"file": "numpy-2.3.4-cp311-...whl", "sha256": "...", "size": 16000000,
            "roles": ["aggregator", "client", "controller"]},
           {"file": "requirements-aggregator.txt", "sha256": "...", "size": 4321,
            "roles": ["aggregator"]}]}
```

A requirement file pins every distribution of its role by version and digest
(`name==version --hash=sha256:...`, fedsky first with the role's extra) and names the wheel it
comes from in a trailing comment (`# file: NAME`), so that one digest (the requirement file's)
covers the list of files to fetch and, through pip's `--require-hashes`, each file's content.
Installs are `pip install --no-index --find-links DIR --require-hashes -r requirements-ROLE.txt`:
no index is ever asked, and a wheel whose bytes differ by one bit is refused.

The controller serves only files the manifest lists, with the size and digest it names
(`check_file`). Everything here is plain functions over the manifest model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Role = Literal["agent", "client", "aggregator", "controller"]
ROLES: tuple[Role, ...] = ("agent", "client", "aggregator", "controller")
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

# A file of the wheelhouse: one path component, no leading dot (so never "." or ".."), the
# characters wheel and requirement file names use.
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$"
_FILE_NAME = re.compile(FILE_NAME_PATTERN)
# {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
_WHEEL = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)"
    r"(?:-(?P<build>\d[A-Za-z0-9_.]*))?-(?P<py>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)"
    r"-(?P<plat>[A-Za-z0-9_.]+)\.whl$"
)
FILE_COMMENT = "# file: "
_CHUNK = 1024 * 1024


class ArtifactError(Exception):
    """A manifest, requirement file or artifact that is missing, malformed or does not match."""


def requirements_file(role: Role) -> str:
    return f"requirements-{role}.txt"


def is_file_name(name: str) -> bool:
    """True for a name the wheelhouse may hold: one component, no traversal, no odd characters."""
    return bool(_FILE_NAME.fullmatch(name)) and ".." not in name


def normalize_name(name: str) -> str:
    """A distribution's name as PEP 503 compares it (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class WheelName:
    name: str  # normalised
    version: str


def parse_wheel_name(file: str) -> WheelName:
    """The distribution and version a wheel's file name states; ArtifactError if it is none."""
    match = _WHEEL.fullmatch(file)
    if match is None:
        raise ArtifactError(f"{file!r} is not a wheel file name")
    return WheelName(name=normalize_name(match["name"]), version=match["version"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Annotated[str, Field(pattern=FILE_NAME_PATTERN)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]
    roles: Annotated[tuple[Role, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _safe(self) -> ManifestEntry:
        if not is_file_name(self.file):
            raise ValueError(f"{self.file!r} is not a plain file name")
        if len(set(self.roles)) != len(self.roles):
            raise ValueError(f"{self.file}: a role is listed twice")
        return self


class Manifest(BaseModel):
    """What a wheelhouse holds: every file with its digest and the roles that install it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    fedsky_version: Annotated[str, Field(min_length=1, max_length=64)]
    python: Annotated[str, Field(pattern=r"^cp\d{2,3}$")]
    files: tuple[ManifestEntry, ...]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [entry.file for entry in self.files]
        if len(set(names)) != len(names):
            raise ValueError("a file is listed twice")
        for role in ROLES:
            entry = self.get(requirements_file(role))
            if entry is not None and entry.roles != (role,):
                raise ValueError(f"{entry.file} must belong to role {role!r} alone")
        return self

    def get(self, file: str) -> ManifestEntry | None:
        return next((entry for entry in self.files if entry.file == file), None)

    def entry(self, file: str) -> ManifestEntry:
        """The entry of `file`; ArtifactError when the manifest does not list it."""
        entry = self.get(file)
        if entry is None:
            raise ArtifactError(f"{file!r} is not listed in the manifest")
        return entry

    def roles(self) -> tuple[Role, ...]:
        """The roles the wheelhouse can install (those with a requirement file)."""
        return tuple(r for r in ROLES if self.get(requirements_file(r)) is not None)

    def requirements(self, role: Role) -> ManifestEntry:
        """The requirement file of `role`; ArtifactError if the wheelhouse was built without it."""
        entry = self.get(requirements_file(role))
        if entry is None:
            raise ArtifactError(
                f"the wheelhouse has no {requirements_file(role)} (it was built for "
                f"{', '.join(self.roles()) or 'no role'})"
            )
        return entry

    def for_role(self, role: Role) -> list[ManifestEntry]:
        return [entry for entry in self.files if role in entry.roles]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """A manifest from its bytes; ArtifactError naming `source` and what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ArtifactError(f"{source}: not a valid wheelhouse manifest: {problems}") from None


def read_manifest(directory: Path) -> Manifest:
    """`directory/manifest.json`; ArtifactError naming the file when missing or invalid."""
    path = directory / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    return parse_manifest(data, source=str(path))


def check_file(manifest: Manifest, directory: Path, file: str, *, digest: bool = True) -> Path:
    """The path of `file` in `directory` if the manifest lists it and it matches; else ArtifactError.

    Checks the name (one plain component), the listing, the size and, unless `digest` is False,
    the SHA-256. The path returned never leaves `directory`.
    """
    if not is_file_name(file):
        raise ArtifactError(f"{file!r} is not a plain file name")
    entry = manifest.entry(file)
    path = directory / entry.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ArtifactError(f"{path}: listed in the manifest but {exc.strerror}") from None
    if size != entry.size:
        raise ArtifactError(f"{path}: {size} bytes, the manifest says {entry.size}")
    if digest and sha256_file(path) != entry.sha256:
        raise ArtifactError(f"{path}: its SHA-256 is not the manifest's {entry.sha256}")
    return path


def verify_directory(directory: Path) -> Manifest:
    """Read the manifest of `directory` and check every file it lists; ArtifactError at the first miss."""
    manifest = read_manifest(directory)
    for entry in manifest.files:
        check_file(manifest, directory, entry.file)
    return manifest


# -- requirement files ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """One line of a requirement file: a distribution at one version from one wheel."""

    name: str
    version: str
    file: str
    sha256: str
    extras: tuple[str, ...] = ()

    def line(self) -> str:
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return (
            f"{self.name}{extras}=={self.version} --hash=sha256:{self.sha256}  "
            f"{FILE_COMMENT}{self.file}"
        )


def render_requirements(role: Role, pins: Sequence[Pin], *, header: str = "") -> str:
    """A requirement file pinning `pins` by version and digest, first pin first, the rest by name."""
    if not pins:
        raise ArtifactError(f"role {role!r} has nothing to install")
    names = [normalize_name(pin.name) for pin in pins]
    if len(set(names)) != len(names):
        raise ArtifactError(f"role {role!r}: a distribution is pinned twice")
    for pin in pins:
        if not is_file_name(pin.file) or not re.fullmatch(r"[0-9a-f]{64}", pin.sha256):
            raise ArtifactError(f"role {role!r}: bad pin for {pin.name}")
    first, rest = pins[0], sorted(pins[1:], key=lambda p: normalize_name(p.name))
    lines = [f"# fedsky {role}: install with --no-index --require-hashes", *header.splitlines()]
    lines += [pin.line() for pin in (first, *rest)]
    return "\n".join(lines) + "\n"


def requirement_files(text: str) -> list[str]:
    """The wheel files a requirement file names (its `# file:` comments), checked to be plain names."""
    files = []
    for line in text.splitlines():
        _, marker, file = line.partition(FILE_COMMENT)
        if not marker or line.lstrip().startswith("#"):
            continue
        file = file.strip()
        if not is_file_name(file):
            raise ArtifactError(f"the requirement file names {file!r}, not a plain file name")
        files.append(file)
    return files


def build_manifest(
    *, directory: Path, fedsky_version: str, python: str, roles_of: dict[str, Iterable[Role]]
) -> Manifest:
    """The manifest of `directory`'s files named in `roles_of` (file -> roles), digests computed."""
    entries = []
    for file in sorted(roles_of):
        roles = tuple(r for r in ROLES if r in set(roles_of[file]))
        path = directory / file
        entries.append(
            ManifestEntry(
                file=file, sha256=sha256_file(path), size=path.stat().st_size, roles=roles
            )
        )
    return Manifest(fedsky_version=fedsky_version, python=python, files=tuple(entries))
