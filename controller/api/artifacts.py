"""The pinned artifacts on the enrolment listener: `GET /v1/artifacts/manifest.json` and
`GET /v1/artifacts/{file}`.

What `make artifacts` built, copied to `[artifacts] dir` (default `<state_dir>/artifacts`), for
the machines that install fedsky: a cloud aggregator's start-up script, a hospital agent
fetching the client payload for its VMs. The files are public (fedsky and its open-source
dependencies), so the routes need no client certificate; what makes them trustworthy is the
digests, which the installing side checks (`pip --require-hashes`, the digest pinned in the
start-up script). The controller still serves only what the manifest lists, by a plain file
name (no path ever reaches the file system), and only while the file has the manifest's size
and digest: a file changed on disk answers 503 rather than bytes that would be refused anyway.
Digests are computed once per version of a file (its inode, size and modification time).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from fedsky.shared.artifacts import (
    MANIFEST_FILE,
    ArtifactError,
    Manifest,
    check_file,
    is_file_name,
    parse_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

ARTIFACTS_PATH = "/v1/artifacts/"
artifact_routes = web.RouteTableDef()


@dataclass
class ArtifactShelf:
    """The served wheelhouse: its manifest (re-read when the file changes) and checked digests."""

    directory: Path
    _manifest: tuple[tuple[int, int, int], bytes, Manifest] | None = None
    _digests: dict[str, tuple[tuple[int, int, int], str]] = field(default_factory=dict)

    @staticmethod
    def _version(stat: os.stat_result) -> tuple[int, int, int]:
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def manifest(self) -> tuple[bytes, Manifest]:
        """The manifest's bytes and model; ArtifactError if there is none or it is invalid."""
        path = self.directory / MANIFEST_FILE
        try:
            version = self._version(path.stat())
        except OSError as exc:
            raise ArtifactError(f"no wheelhouse manifest at {path}: {exc.strerror}") from None
        if self._manifest is None or self._manifest[0] != version:
            raw = path.read_bytes()
            self._manifest = (version, raw, parse_manifest(raw, source=str(path)))
            self._digests.clear()
        return self._manifest[1], self._manifest[2]

    def _checked(self, manifest: Manifest, file: str) -> Path:
        path = check_file(manifest, self.directory, file, digest=False)
        version = self._version(path.stat())
        known = self._digests.get(file)
        digest = known[1] if known is not None and known[0] == version else sha256_file(path)
        if digest != manifest.entry(file).sha256:
            raise ArtifactError(f"{path}: its SHA-256 is not the manifest's")
        self._digests[file] = (version, digest)
        return path

    async def file(self, file: str) -> tuple[Path, str]:
        """A listed file's path and digest, checked; KeyError if unlisted, ArtifactError if wrong."""
        _, manifest = await asyncio.to_thread(self.manifest)
        if not is_file_name(file) or manifest.get(file) is None:
            raise KeyError(file)
        path = await asyncio.to_thread(self._checked, manifest, file)
        return path, manifest.entry(file).sha256


SHELF = web.AppKey("artifacts", ArtifactShelf)


def _shelf(request: web.Request) -> ArtifactShelf:
    shelf = request.app.get(SHELF)
    if shelf is None:
        raise web.HTTPServiceUnavailable(text="this controller serves no artifacts\n")
    return shelf


@artifact_routes.get(ARTIFACTS_PATH + MANIFEST_FILE)
async def manifest(request: web.Request) -> web.Response:
    shelf = _shelf(request)
    try:
        raw, _ = await asyncio.to_thread(shelf.manifest)
    except ArtifactError as exc:
        log.warning("artifacts: %s", exc)
        raise web.HTTPServiceUnavailable(text="no valid wheelhouse on this controller\n") from None
    return web.Response(body=raw, content_type="application/json")


@artifact_routes.get(ARTIFACTS_PATH + "{file}")
async def artifact(request: web.Request) -> web.StreamResponse:
    shelf = _shelf(request)
    file = request.match_info["file"]
    try:
        path, digest = await shelf.file(file)
    except KeyError:
        raise web.HTTPNotFound(text="no such artifact\n") from None
    except ArtifactError as exc:
        log.error("artifacts: refusing to serve %s: %s", file, exc)
        raise web.HTTPServiceUnavailable(
            text="the controller's copy does not match its manifest\n"
        ) from None
    return web.FileResponse(
        path,
        chunk_size=256 * 1024,
        headers={"Content-Type": "application/octet-stream", "X-Fedsky-Sha256": digest},
    )
