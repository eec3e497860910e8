"""Identities: agent ids, reserved names and `cloud:region` locations."""

from __future__ import annotations

import re

AGENT_ID_PATTERN = r"^[a-z0-9-]{1,63}$"
_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)
_LOCATION_RE = re.compile(r"^[a-z0-9-]{1,32}:[a-z0-9-]{1,63}$")

CONTROLLER_ID = "controller"
AGGREGATOR_PREFIX = "agg-"


class InvalidIdError(ValueError):
    """An id or location that does not follow fedsky's naming rules."""


def check_agent_id(name: str) -> str:
    """Return `name` if it can be enrolled as an agent, else raise InvalidIdError."""
    if not _AGENT_ID_RE.fullmatch(name):
        raise InvalidIdError(
            f"agent id {name!r} is invalid: use 1-63 characters from a-z, 0-9 and '-'"
        )
    if name == CONTROLLER_ID:
        raise InvalidIdError(f"agent id {name!r} is reserved for the controller")
    if name.startswith(AGGREGATOR_PREFIX):
        raise InvalidIdError(
            f"agent id {name!r} is reserved: ids starting {AGGREGATOR_PREFIX!r} are aggregators"
        )
    return name


def is_agent_id(name: str) -> bool:
    try:
        check_agent_id(name)
    except InvalidIdError:
        return False
    return True


def is_aggregator_id(name: str) -> bool:
    return name.startswith(AGGREGATOR_PREFIX) and bool(_AGENT_ID_RE.fullmatch(name))


def aggregator_id(job_id: str) -> str:
    """The bus identity of a job's aggregator."""
    ident = f"{AGGREGATOR_PREFIX}{job_id}"
    if not _AGENT_ID_RE.fullmatch(ident):
        raise InvalidIdError(f"job id {job_id!r} does not make a valid aggregator id")
    return ident


# A hospital's SuperNode, named for its agent in its TLS certificate: never an agent id itself,
# so such a certificate can never stand for the agent on the bus.
NODE_SUFFIX = ".node"


def node_name(agent_id: str) -> str:
    return check_agent_id(agent_id) + NODE_SUFFIX


def is_node_name(name: str | None) -> bool:
    """`<agent id>.node`, the name in a SuperNode's certificate."""
    if name is None or not name.endswith(NODE_SUFFIX):
        return False
    return is_agent_id(name[: -len(NODE_SUFFIX)])


def check_location(location: str) -> str:
    """Return `location` if it is a `cloud:region` id such as `aws:ap-northeast-2`."""
    if not _LOCATION_RE.fullmatch(location):
        raise InvalidIdError(
            f"location {location!r} is invalid: expected 'cloud:region', e.g. 'aws:us-east-1'"
        )
    return location
