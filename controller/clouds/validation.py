"""What a cloud said about a credential: the outcome every plug-in's validation returns."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_MISSING = "missing-permissions"
STATUS_REGION = "unknown-region"
STATUS_UNREACHABLE = "unreachable"

# Only a sanity check of the characters: whether a region exists is the cloud's answer.
REGION_RE = re.compile(r"^[a-z][a-z0-9-]{1,40}$")


@dataclass(frozen=True)
class ValidationResult:
    """What the cloud said about a credential: names account and identity, and what is missing."""

    cloud: str
    status: str
    account: str | None
    identity: str | None
    region: str | None
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "cloud": self.cloud,
            "status": self.status,
            "account": self.account,
            "identity": self.identity,
            "region": self.region,
            "missing": list(self.missing),
            "notes": list(self.notes),
            "message": self.message,
        }


def missing_message(
    identity: str | None, account: str | None, where: str, missing: Collection[str]
) -> str:
    """What to tell the operator when the identity lacks permissions (`where`: account, project)."""
    return (
        f"{identity} in {where} {account} lacks {', '.join(missing)}; grant these (docs/clouds.md has a "
        "policy) and run `fedctl clouds verify`"
    )
