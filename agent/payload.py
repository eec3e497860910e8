"""The client payload for the VMs: fetched from the pinned artifacts, checked, cached here.

Hospital VMs have no internet. The agent fetches the `client` role of the release wheelhouse
(`make artifacts`) from the controller's enrolment listener (`https://.../v1/artifacts/`, TLS
verified against fedsky's CA from the agent's enrolment bundle) or from a mirror the operator
runs, into a cache under its state directory, and the ssh executor copies it into the VM and
installs it there with `pip --no-index --require-hashes` (`SshExecutor.ensure_payload`).

What vouches for what:

- the digest of `requirements-client.txt` is the root: pinned in `[payload]
  requirements_sha256`, or else read from the manifest fetched over a connection verified with
  fedsky's CA (the controller vouches for its release; a mirror's manifest is never trusted, so
  a mirror needs the pin);
- that file pins every wheel by version and SHA-256 (`--hash=sha256:...`) and names its file
  (`# file: NAME`); every wheel is checked against both that hash and the manifest's size and
  digest before it is cached, and again when a cached copy is reused;
- in the VM, pip checks every wheel once more (`--require-hashes`).

A changed byte anywhere makes the install fail; it can never install something else.

Every network and file operation here is blocking: the agent runs them through its one
worker thread (`blocking`), one file per call, so its inventory calls interleave with a long
download. Plain `http.client` over TLS: no proxy from the environment, no redirect followed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from fedsky.agent.executors.base import ExecutorError, check_remote_path
from fedsky.shared.artifacts import (
    FILE_COMMENT,
    MANIFEST_FILE,
    ArtifactError,
    Manifest,
    ManifestEntry,
    is_file_name,
    parse_manifest,
    requirements_file,
    sha256_file,
)
from fedsky.shared.config import resolve_path
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

log = logging.getLogger(__name__)

T = TypeVar("T")
Blocking = Callable[[Callable[[], T]], Awaitable[T]]

ROLE: Literal["client"] = "client"
REQUIREMENTS = requirements_file(ROLE)
# In the VM, inside the venv: the requirement file digest of the installed payload.
MARKER_NAME = "fedsky-payload.sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_CHUNK = 256 * 1024


class PayloadUnavailable(ExecutorError):
    """The client payload could not be fetched or did not match its digests (nothing was
    copied into the VM)."""


class PayloadInstallFailed(ExecutorError):
    """Installing the client payload inside the VM failed (venv, Python version, pip)."""


class PayloadConfig(BaseModel):
    """`[payload]`: where the agent gets the client payload it installs into the VMs.

    Without this section the agent installs nothing: the VMs must already hold the payload in
    `[executor] remote_bin_dir` (an image built with it), and a start only checks it is there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The artifacts base URL: the controller's enrolment listener, `https://HOST:PORT/v1/artifacts/`,
    # or an operator's mirror of `dist/wheelhouse/`. https only.
    url: str
    # The CA that verifies `url`'s certificate. Unset: fedsky's CA (the agent's `tls.ca_file`,
    # from its enrolment bundle): the controller's manifest is then trusted for the digest of
    # the requirement file. A path (a mirror's CA) or "system" (the system's CAs): a mirror,
    # whose manifest is not trusted, so `requirements_sha256` is required.
    ca_file: Literal["system"] | Path | None = None
    # The pinned SHA-256 of requirements-client.txt (the manifest's entry for it). Wins over
    # the manifest: a controller serving another release is refused.
    requirements_sha256: Annotated[str, Field(pattern=_SHA256.pattern)] | None = None
    # In the VM: the Python that makes the venv (must match the wheels' Python, e.g. 3.11) and
    # where the wheels are copied (relative to the login's home; removed after an install).
    remote_python: str = "python3"
    remote_wheel_dir: str = ".fedsky/wheelhouse"
    # On this host: the cache of fetched files (default: state_dir/payload).
    cache_dir: Path | None = None
    # Once a task's SuperNode runs, install the payload into this agent's other running VMs,
    # one at a time, so that a failover to one of them starts at once instead of after an
    # install of minutes. Off: a VM gets the payload when a task first starts in it.
    prestage: bool = True
    # Socket timeout of each request, and time allowed for copying and installing in a VM.
    fetch_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    install_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 1800.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_artifacts_url(value)

    @field_validator("ca_file", "cache_dir", mode="after")
    @classmethod
    def _paths(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Path):
            return resolve_path(value, (info.context or {}).get("config_dir"))
        return value

    @field_validator("remote_python", "remote_wheel_dir")
    @classmethod
    def _remote(cls, value: str) -> str:
        check_remote_path(value, absolute=False)
        if any(c.isspace() or c in ";&|<>()*?[]{}~#!" for c in value):
            raise ValueError("a remote path must not contain spaces or shell characters")
        return value

    @model_validator(mode="after")
    def _trust(self) -> PayloadConfig:
        if self.ca_file is not None and self.requirements_sha256 is None:
            raise ValueError(
                "a mirror (ca_file set) is not vouched for by fedsky's CA, so its manifest is "
                "not trusted: set requirements_sha256 to the SHA-256 of requirements-client.txt "
                "in the controller's manifest"
            )
        return self


def check_artifacts_url(value: str) -> str:
    """An https base URL with a host and no query or fragment; returned ending in `/`."""
    parts = urlsplit(value.strip())
    if parts.scheme != "https":
        raise ValueError("expected an https URL (the artifacts are fetched over TLS only)")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError("expected https://HOST[:PORT]/PATH/ with a host and no user name")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("the URL's port is not a number in 1-65535") from None
    text = value.strip()
    return text if text.endswith("/") else text + "/"


@dataclass(frozen=True)
class PayloadSource:
    """`[payload]` resolved against the agent's config: what `ensure_payload` works from."""

    url: str
    ca_file: Path | None  # None: the system's CAs
    manifest_trusted: bool  # verified with fedsky's CA: its requirement digest counts
    requirements_sha256: str | None
    cache_dir: Path
    remote_python: str
    remote_wheel_dir: str
    fetch_timeout_s: float
    install_timeout_s: float
    prestage: bool = True

    @classmethod
    def from_config(
        cls, config: PayloadConfig, *, fedsky_ca_file: Path, state_dir: Path
    ) -> PayloadSource:
        ca = config.ca_file
        return cls(
            url=config.url,
            ca_file=None if ca == "system" else (ca if isinstance(ca, Path) else fedsky_ca_file),
            manifest_trusted=ca is None,
            requirements_sha256=config.requirements_sha256,
            cache_dir=config.cache_dir or state_dir / "payload",
            remote_python=config.remote_python,
            remote_wheel_dir=config.remote_wheel_dir,
            fetch_timeout_s=config.fetch_timeout_s,
            install_timeout_s=config.install_timeout_s,
            prestage=config.prestage,
        )


@dataclass(frozen=True)
class LocalPayload:
    """The client payload, checked, in the cache: what goes into a VM."""

    requirements_sha256: str
    python: str  # the wheels' Python tag, e.g. cp311
    directory: Path
    # File name -> SHA-256: the requirement file first, then the wheels it names.
    files: dict[str, str]


# -- reading the requirement file --------------------------------------------------------------


def requirement_hashes(text: str) -> dict[str, frozenset[str]]:
    """File name -> the SHA-256 digests its requirement line allows (`--hash` + `# file:`)."""
    pinned: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        requirement, marker, file = line.partition(FILE_COMMENT)
        if not marker or line.lstrip().startswith("#"):
            continue
        file = file.strip()
        if not is_file_name(file):
            raise ArtifactError(f"{REQUIREMENTS} names {file!r}, not a plain file name")
        hashes = frozenset(_HASH.findall(requirement))
        if not hashes:
            raise ArtifactError(f"{REQUIREMENTS} pins {file} without a --hash=sha256")
        if file in pinned:
            raise ArtifactError(f"{REQUIREMENTS} names {file} twice")
        pinned[file] = hashes
    if not pinned:
        raise ArtifactError(f"{REQUIREMENTS} names no wheel")
    return pinned


# -- fetching (blocking) -------------------------------------------------------------------------


class ArtifactClient:
    """GETs files below the artifacts URL over verified TLS; each call is blocking."""

    def __init__(self, source: PayloadSource) -> None:
        self.source = source
        parts = urlsplit(source.url)
        assert parts.hostname is not None
        self.host = parts.hostname
        self.port = parts.port or 443
        self.base_path = parts.path or "/"
        self.where = f"{parts.hostname}:{self.port}"

    def _context(self) -> ssl.SSLContext:
        try:
            if self.source.ca_file is None:
                ctx = ssl.create_default_context()
            else:
                ctx = ssl.create_default_context(cafile=str(self.source.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise PayloadUnavailable(
                f"cannot read the CA for the artifacts ([payload] ca_file): {exc.strerror or exc}"
            ) from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def get(self, file: str, sink: Callable[[bytes], None], *, max_bytes: int) -> None:
        """Stream `file` into `sink`; PayloadUnavailable on any failure (no local paths said)."""
        if not is_file_name(file):
            raise PayloadUnavailable(f"refusing to fetch {file!r}: not a plain file name")
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._context(), timeout=self.source.fetch_timeout_s
        )
        what = f"{file} from {self.where}"
        try:
            conn.request("GET", self.base_path + file, headers={"Accept": "*/*"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise PayloadUnavailable(
                    f"fetching {what}: HTTP {resp.status} {resp.reason}"
                    + (
                        " (the server's copy does not match its manifest)"
                        if resp.status == 503
                        else ""
                    )
                )
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise PayloadUnavailable(f"fetching {what}: larger than the manifest says")
            seen = 0
            while chunk := resp.read(_CHUNK):
                seen += len(chunk)
                if seen > max_bytes:
                    raise PayloadUnavailable(f"fetching {what}: larger than the manifest says")
                sink(chunk)
        except ssl.SSLCertVerificationError as exc:
            raise PayloadUnavailable(
                f"fetching {what}: the server's certificate is not trusted "
                f"({exc.verify_message or 'verify failed'}; check [payload] url and ca_file)"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise PayloadUnavailable(
                f"the artifacts at {self.where} cannot be reached ({reason}): fetching {file}"
            ) from None
        finally:
            conn.close()


class PayloadCache:
    """The checked client payload under `cache_dir`: one blocking step per method call."""

    def __init__(self, source: PayloadSource, client: ArtifactClient | None = None) -> None:
        self.source = source
        self.directory = source.cache_dir
        self.client = client or ArtifactClient(source)

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise PayloadUnavailable(
                f"cannot make the payload cache ([payload] cache_dir): {exc.strerror}"
            ) from None

    def manifest(self) -> Manifest:
        """The manifest from the server, kept as the last good copy; the kept copy when the
        server cannot be reached (it was fetched the same checked way)."""
        self._ensure_dir()
        buffer = bytearray()
        try:
            self.client.get(MANIFEST_FILE, buffer.extend, max_bytes=4 * 1024 * 1024)
        except PayloadUnavailable as exc:
            kept = self.directory / MANIFEST_FILE
            if not kept.is_file():
                raise
            log.warning("payload: %s; using the manifest fetched before", exc)
            return self._parse(kept.read_bytes(), what="the cached manifest")
        manifest = self._parse(bytes(buffer), what=f"the manifest from {self.client.where}")
        self._write(MANIFEST_FILE, bytes(buffer))
        return manifest

    @staticmethod
    def _parse(data: bytes, *, what: str) -> Manifest:
        try:
            return parse_manifest(data, source=what)
        except ArtifactError as exc:
            raise PayloadUnavailable(str(exc)) from None

    def _write(self, name: str, data: bytes) -> None:
        part = self.directory / f".{name}.part"
        try:
            part.write_bytes(data)
            os.replace(part, self.directory / name)
        except OSError as exc:
            raise PayloadUnavailable(f"cannot write the payload cache: {exc.strerror}") from None

    def expected_digest(self, manifest: Manifest) -> str:
        """The requirement file's digest: the pin, else the (trusted) manifest's."""
        try:
            entry = manifest.requirements(ROLE)
        except ArtifactError as exc:
            raise PayloadUnavailable(str(exc)) from None
        pin = self.source.requirements_sha256
        if pin is not None and entry.sha256 != pin:
            raise PayloadUnavailable(
                f"the artifacts at {self.client.where} are another release: their "
                f"{REQUIREMENTS} is {entry.sha256[:16]}..., [payload] requirements_sha256 pins "
                f"{pin[:16]}..."
            )
        if pin is None and not self.source.manifest_trusted:
            raise PayloadUnavailable("no trusted digest for the payload (set requirements_sha256)")
        return entry.sha256

    def fetch(self, entry: ManifestEntry, allowed: frozenset[str]) -> Path:
        """`entry`'s file in the cache, with the manifest's size and a digest in `allowed`
        (and the manifest's): a cached copy that matches is reused, anything else fetched."""
        if entry.sha256 not in allowed:
            raise PayloadUnavailable(
                f"{entry.file}: the manifest's SHA-256 is not the one {REQUIREMENTS} pins: refused"
            )
        self._ensure_dir()
        path = self.directory / entry.file
        with contextlib.suppress(OSError):
            if path.stat().st_size == entry.size and sha256_file(path) == entry.sha256:
                return path
        part = self.directory / f".{entry.file}.part"
        digest = hashlib.sha256()
        try:
            with part.open("wb") as out:

                def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    out.write(chunk)

                self.client.get(entry.file, sink, max_bytes=entry.size)
            size = part.stat().st_size
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise PayloadUnavailable(
                    f"{entry.file} from {self.client.where} does not have the SHA-256 "
                    f"{REQUIREMENTS} and the manifest pin ({size} bytes, expected "
                    f"{entry.size}): refused, not copied to any VM"
                )
            os.replace(part, path)
        except OSError as exc:
            raise PayloadUnavailable(
                f"cannot write {entry.file} into the payload cache: {exc.strerror}"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                part.unlink()
        return path

    def prune(self, keep: set[str]) -> None:
        """Remove cached files of other releases."""
        for path in self.directory.iterdir():
            if path.name not in keep and path.name != MANIFEST_FILE and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()


async def fetch_payload(
    cache: PayloadCache, manifest: Manifest, expected: str, blocking: Blocking[Any]
) -> LocalPayload:
    """Fetch (or reuse) the requirement file and every wheel it names, each checked."""
    req_entry = manifest.requirements(ROLE)
    if req_entry.sha256 != expected:
        raise PayloadUnavailable(f"{REQUIREMENTS}: not the pinned digest")
    req_path = await blocking(lambda: cache.fetch(req_entry, frozenset({expected})))
    text = await blocking(lambda: req_path.read_text(encoding="utf-8"))
    try:
        pinned = requirement_hashes(text)
    except ArtifactError as exc:
        raise PayloadUnavailable(str(exc)) from None
    files = {REQUIREMENTS: expected}
    for file, allowed in pinned.items():
        entry = manifest.get(file)
        if entry is None:
            raise PayloadUnavailable(f"{REQUIREMENTS} names {file}, which the manifest lacks")
        await blocking(functools.partial(cache.fetch, entry, allowed))
        files[file] = entry.sha256
    await blocking(lambda: cache.prune(set(files)))
    return LocalPayload(
        requirements_sha256=expected,
        python=manifest.python,
        directory=cache.directory,
        files=files,
    )
