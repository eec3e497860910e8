"""The `[api]` and `[artifacts]` sections of `controller.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fedsky.controller.settings import (
    Section,
    check_advertised_host,
    check_bind_host,
    is_wildcard,
)
from fedsky.shared.artifacts import ArtifactError, check_file, read_manifest
from fedsky.shared.config import resolve_path
from fedsky.shared.net import parse_listen
from pydantic import Field, ValidationInfo, field_validator, model_validator


class ApiConfig(Section):
    # The unix socket (default: <state_dir>/controller.sock): the file's owner and group (the
    # operators) may use the API, nobody else.
    socket: Path | None = None
    socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    # The API over the network: "host:port", TLS with a certificate from fedsky's CA, every
    # request with a user's token (`fedctl users add`). Off by default.
    listen: str | None = None
    # Names (host names or addresses) the listener's certificate carries, the ones clients use;
    # default: `listen`'s host when it is not a wildcard.
    public_names: list[Annotated[str, Field(min_length=1, max_length=253)]] = []
    # How long a browser session (a token traded for a cookie, `POST /v1/session`) lasts.
    session_ttl_s: Annotated[float, Field(ge=60, le=7 * 86400)] = 12 * 3600.0
    # How often a live stream (`/v1/events`, the dashboard's) looks for changes, and how many
    # streams may be open at once.
    events_interval_s: Annotated[float, Field(ge=0.2, le=60)] = 1.0
    max_event_streams: Annotated[int, Field(ge=1, le=1000)] = 32
    # Refused: kept so that a config that still sets it is told why (docs/security.md).
    tcp: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _ = parse_listen(value)
        check_bind_host(host)
        return value

    @field_validator("public_names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [check_advertised_host(name) for name in value]

    @model_validator(mode="after")
    def _listener_has_names(self) -> ApiConfig:
        if self.listen is not None and not self.certificate_names():
            raise ValueError(
                "api.listen binds every address: give the names clients use to reach the API "
                "in api.public_names (its certificate carries them)"
            )
        return self

    def certificate_names(self) -> list[str]:
        """The listener certificate's names: `public_names`, and `listen`'s host unless it is a
        wildcard."""
        names = list(self.public_names)
        host = (self.listen or "").rpartition(":")[0].strip("[]")
        if host and not is_wildcard(host) and host not in names:
            names.insert(0, host)
        return names

    @field_validator("tcp")
    @classmethod
    def _no_plain_tcp(cls, value: str | None) -> str | None:
        if value is None:
            return None
        raise ValueError(
            "plain HTTP without authentication is not served (anyone reaching the port could "
            "enrol an agent and take its key): use api.listen, the API over TLS with users' "
            "tokens (fedctl users add), or the unix socket; see docs/security.md"
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
