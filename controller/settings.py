"""What every part's settings share: a strict, frozen section of `controller.toml`, and the
checks for the addresses its listeners bind and advertise.

Every listener has two addresses. The bind address is where the socket listens on this host:
an IP literal or `localhost` (a name that resolves elsewhere would make the listener move with
DNS). The advertised address is what the other machines are told and what the listener's
certificate names: one specific host, never a wildcard, so when a listener binds every address
(`0.0.0.0`, `::`) the advertised one must be set.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Port = Annotated[int, Field(ge=0, le=65535)]

WILDCARDS = ("0.0.0.0", "::")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class Section(BaseModel):
    """One `[section]` of the controller's config: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def is_wildcard(host: str) -> bool:
    """Does `host` bind every address of the machine (`0.0.0.0`, `::`)?"""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def check_bind_host(value: str) -> str:
    """A bind address: an IP literal (a wildcard included) or `localhost`; ValueError if not."""
    if value == "localhost":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            "a bind address must be an IP address of this host (or 0.0.0.0 / :: for every "
            "address) or 'localhost', not a host name"
        ) from None


def check_advertised_host(value: str) -> str:
    """An advertised address: one specific IP address or DNS name; ValueError if not."""
    text = value.strip()
    if not text:
        raise ValueError("an advertised address must name a host, not be empty")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        name = text.rstrip(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ValueError(
                "an advertised address must be an IP address or a DNS name (letters, digits, "
                "hyphens and dots; no scheme, port or brackets)"
            ) from None
        return name.lower()
    if ip.is_unspecified:
        raise ValueError(
            f"{text} is a wildcard: advertise the one address or name the other machines reach "
            "this host at"
        )
    return str(ip)


def advertised_for(bind_key: str, bind: str, advertised: str | None, key: str) -> str | None:
    """Check an optional advertised address against its bind address (both already parsed).

    Unset is fine unless the bind address is a wildcard: the other machines cannot be told
    "every address".
    """
    if advertised is None:
        if is_wildcard(bind):
            raise ValueError(
                f"{key} must be set: {bind_key} = {bind!r} listens on every address, so say which "
                "one the other machines reach (an IP address or a DNS name)"
            )
        return None
    return check_advertised_host(advertised)


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
