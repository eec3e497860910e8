"""The `[pki]` section of `controller.toml`: certificates the controller issues to agents."""

from __future__ import annotations

from typing import Annotated

from fedsky.controller.settings import Section
from pydantic import Field


class PkiConfig(Section):
    # Validity of an agent's certificate, at enrolment and at each renewal.
    agent_cert_days: Annotated[int, Field(ge=1, le=825)] = 365
    # An agent's renewal is refused this soon after its last certificate (each certificate
    # stays valid until it expires, so renewals are bounded).
    renewal_min_interval_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 3600.0
