"""Loopback ports for test servers, and for clients that must find nobody listening."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it, then it is released).

    Bind it soon: another process may take it. Until someone does, nothing listens there,
    so a connect to it is refused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
