"""The HTTP client `fedctl` uses to reach the running controller (unix socket by default)."""

from __future__ import annotations

import json
import os
import socket
import ssl
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedsky.shared import exitcodes

DEFAULT_CONFIG = Path("/etc/fedsky/controller.toml")


class ControllerUnavailable(Exception):
    """No controller answers at the configured address."""


class ApiError(Exception):
    """The controller answered with an error; `message` is what it said."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body or {}

    @property
    def exit_code(self) -> int:
        """The exit code the controller gave (69 for a cloud it cannot reach, ...), when it is
        one of fedsky's; else 1."""
        code = self.body.get("exit_code")
        return code if isinstance(code, int) and code in _EXIT_CODES else exitcodes.FAILED


_EXIT_CODES = frozenset(
    (
        exitcodes.FAILED,
        exitcodes.USAGE,
        exitcodes.INFEASIBLE,
        exitcodes.UNAVAILABLE,
        exitcodes.CONFIG,
    )
)


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass(frozen=True)
class ApiClient:
    """`address` is a unix socket path, `https://host:port` (the API's network listener: the
    server checked against `ca_file`, `token` sent as a bearer token) or `http://host:port`
    (a test's plain listener)."""

    address: str
    timeout: float = 30.0
    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    def _connection(self) -> HTTPConnection:
        if self.address.startswith(("http://", "https://")):
            parts = urlsplit(self.address)
            host = parts.hostname or "127.0.0.1"
            if parts.scheme == "https":
                if self.ca_file is None:
                    raise ControllerUnavailable(
                        "an https address needs the CA certificate that signed the API's "
                        "(fedctl --ca FILE, or FEDSKY_CA)"
                    )
                try:
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise ControllerUnavailable(
                        f"cannot use the CA certificate {self.ca_file}: {exc}"
                    ) from None
                return HTTPSConnection(
                    host, parts.port or 443, timeout=self.timeout, context=context
                )
            return HTTPConnection(host, parts.port or 80, timeout=self.timeout)
        return _UnixHTTPConnection(self.address, self.timeout)

    def _open(self, method: str, path: str, body: bytes | None, content_type: str) -> HTTPResponse:
        conn = self._connection()
        headers = {"Content-Type": content_type} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn.getresponse()
        except ssl.SSLError as exc:
            raise ControllerUnavailable(
                f"TLS with {self.address} failed: {exc.reason or exc} (is --ca the CA of this "
                "controller, and the address one of the API's public names?)"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControllerUnavailable(
                f"the controller is not running (nothing answers at {self.address}: {exc.strerror}); "
                "start it with `fedsky-controller --config FILE` or `systemctl start fedsky-controller`"
            ) from None
        except PermissionError:
            raise ControllerUnavailable(
                f"permission denied on {self.address}: join the controller's operator group"
            ) from None
        except OSError as exc:
            raise ControllerUnavailable(
                f"cannot reach the controller at {self.address}: {exc}"
            ) from None

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        return self._answer(self._open(method, path, body, "application/json"))

    @staticmethod
    def _answer(resp: HTTPResponse) -> Any:
        """The JSON body; ApiError with the controller's message for a status >= 400 (a body that
        is not JSON is shown as text, never a decoding traceback)."""
        raw = resp.read()
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = None
        if resp.status >= 400:
            message = data.get("error") if isinstance(data, dict) else raw.decode(errors="replace")
            raise ApiError(resp.status, str(message), data if isinstance(data, dict) else None)
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any = None) -> Any:
        return self.request("POST", path, payload if payload is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> Any:
        return self._answer(self._open("POST", path, data, content_type))

    def download(self, path: str) -> tuple[bytes, dict[str, str]]:
        resp = self._open("GET", path, None, "")
        raw = resp.read()
        if resp.status >= 400:
            try:
                message = json.loads(raw).get("error", "")
            except (json.JSONDecodeError, AttributeError):
                message = raw.decode(errors="replace")
            raise ApiError(resp.status, str(message))
        return raw, dict(resp.getheaders())


def config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("FEDSKY_CONTROLLER_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG
