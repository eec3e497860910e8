"""Loopback ports for the servers fedsky starts on this host (a local SuperLink, a onebox)."""

from __future__ import annotations

import socket


def parse_listen(value: str) -> tuple[str, int]:
    """A listener's "host:port" (an IPv6 host in brackets): (host, port); ValueError naming the
    value otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:8443), not {value[:80]!r}")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it, then it is released).

    Bind it soon: another process may take it in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
