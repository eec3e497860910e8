"""The `[api]` and `[artifacts]` sections of `controller.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fedsky.controller.settings import Section
from fedsky.shared.artifacts import ArtifactError, check_file, read_manifest
from fedsky.shared.config import resolve_path
from pydantic import Field, ValidationInfo, field_validator


class ApiConfig(Section):
    # The unix socket (default: <state_dir>/controller.sock): the file's owner and group (the
    # operators) may use the API, nobody else.
    socket: Path | None = None
    socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    # Refused: kept so that a config that still sets it is told why (docs/security.md).
    tcp: str | None = None

    @field_validator("tcp")
    @classmethod
    def _no_plain_tcp(cls, value: str | None) -> str | None:
        if value is None:
            return None
        raise ValueError(
            "the API is not served over TCP: it would be plain HTTP without authentication "
            "(anyone reaching the port could enrol an agent and take its key). Use the unix "
            "socket, from another machine over ssh (ssh -L /tmp/fedsky.sock:SOCKET host, then "
            "fedctl --socket /tmp/fedsky.sock); see docs/security.md"
        )


class ArtifactsConfig(Section):
    """`[artifacts]`: the pinned wheelhouse (`make artifacts`) that enrolled machines install from.

    The controller serves `dir` on its enrolment listener (`/v1/artifacts/`) and writes the
    digest of its `requirements-aggregator.txt` into every aggregator VM's start-up script, so
    the digests always come from here, whichever URL the machines fetch from.
    """

    # Default: <state_dir>/artifacts. Set explicitly, it must hold a valid manifest at start.
    dir: Path | None = None
    # A mirror of the same files the operator runs (https, ending in '/'), fetched from instead
    # of the enrolment listener. Its content is checked against `dir`'s digests all the same.
    url: str | None = None

    @field_validator("dir")
    @classmethod
    def _wheelhouse(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        directory = resolve_path(value, (info.context or {}).get("config_dir"))
        try:
            manifest = read_manifest(directory)
            for entry in manifest.files:
                check_file(manifest, directory, entry.file, digest=False)
        except ArtifactError as exc:
            raise ValueError(
                f"{exc} (build it with `make artifacts`, copy dist/wheelhouse)"
            ) from None
        return directory

    @field_validator("url")
    @classmethod
    def _mirror(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                "must be an https URL with a host (no query), e.g. https://mirror.example/fedsky/"
            )
        return value if value.endswith("/") else value + "/"
