"""How the API answers the controller's domain errors: one table, kind -> HTTP status and exit code.

Services raise errors that say what went wrong (`clouds.errors`, `security.aggregators`, ...)
and never how to answer it; the API's error middleware (`app.py`) looks the error up here. An
error is answered by the row of its class, or else of its nearest base class in the table; one
in no row is a bug, answered 500 without detail. To answer a new kind of error, add a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedsky.controller.clouds.errors import (
    AccountExists,
    AccountNotFound,
    CloudError,
    CloudUnreachable,
    CloudUsageError,
    CredentialFormatError,
    CredentialRejected,
    SealedCredentialError,
    UnknownCloud,
)
from fedsky.controller.security.aggregators import AggregatorRefused, ModelUnavailable
from fedsky.controller.services import PartUnavailable
from fedsky.shared import exitcodes


@dataclass(frozen=True)
class HttpAnswer:
    """The HTTP status of the response, and the exit code `fedctl` leaves with."""

    status: int
    exit_code: int = exitcodes.FAILED


ERROR_ANSWERS: Mapping[type[Exception], HttpAnswer] = {
    PartUnavailable: HttpAnswer(503, exitcodes.UNAVAILABLE),
    # Linked cloud accounts.
    CloudError: HttpAnswer(400),
    CredentialFormatError: HttpAnswer(400),
    CloudUsageError: HttpAnswer(400, exitcodes.USAGE),
    UnknownCloud: HttpAnswer(404),
    AccountNotFound: HttpAnswer(404),
    AccountExists: HttpAnswer(409),
    CredentialRejected: HttpAnswer(422),
    CloudUnreachable: HttpAnswer(502, exitcodes.UNAVAILABLE),
    SealedCredentialError: HttpAnswer(500),
    # Cloud aggregator VMs.
    AggregatorRefused: HttpAnswer(403),
    ModelUnavailable: HttpAnswer(404),
}


@dataclass(frozen=True)
class Problem:
    """A domain error as the API answers it: `{"error": message, "exit_code": N, **extra}`."""

    status: int
    exit_code: int
    message: str
    extra: dict[str, object] = field(default_factory=dict)


def answer_for(exc: BaseException) -> HttpAnswer | None:
    """The table's row for `exc` (its class's, else its nearest listed base class's)."""
    for kind in type(exc).__mro__:
        answer = ERROR_ANSWERS.get(kind)
        if answer is not None:
            return answer
    return None


def problem_for(exc: BaseException) -> Problem | None:
    """How the API answers `exc`; None for an error no row answers."""
    answer = answer_for(exc)
    if answer is None:
        return None
    extra: dict[str, object] = {}
    if isinstance(exc, CloudError) and exc.result is not None:
        extra["validation"] = exc.result.to_json()  # what the cloud said, for `fedctl`
    return Problem(answer.status, answer.exit_code, str(exc), extra)
