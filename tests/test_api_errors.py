"""The one table from domain errors to HTTP statuses and exit codes."""

from __future__ import annotations

import pytest
from fedsky.controller.api.errors import ERROR_ANSWERS, HttpAnswer, Problem, problem_for
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
from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.security.aggregators import AggregatorRefused, ModelUnavailable
from fedsky.controller.services import PartUnavailable
from fedsky.shared import exitcodes


@pytest.mark.parametrize(
    ("error", "status", "exit_code"),
    [
        (CredentialFormatError("not a key"), 400, exitcodes.FAILED),
        (CloudUsageError("bad region"), 400, exitcodes.USAGE),
        (UnknownCloud("azure"), 404, exitcodes.FAILED),
        (AccountNotFound("no prod"), 404, exitcodes.FAILED),
        (AccountExists("prod"), 409, exitcodes.FAILED),
        (CredentialRejected("refused"), 422, exitcodes.FAILED),
        (CloudUnreachable("down"), 502, exitcodes.UNAVAILABLE),
        (SealedCredentialError("other key"), 500, exitcodes.FAILED),
        (AggregatorRefused("no cert"), 403, exitcodes.FAILED),
        (ModelUnavailable("job ended"), 404, exitcodes.FAILED),
        (PartUnavailable("no bus"), 503, exitcodes.UNAVAILABLE),
    ],
)
def test_each_kind_has_its_answer(error: Exception, status: int, exit_code: int) -> None:
    assert problem_for(error) == Problem(status, exit_code, str(error))


def test_a_validation_goes_with_the_answer() -> None:
    result = ValidationResult("aws", "invalid", "123", "arn:x", "us-east-1", message="refused")
    problem = problem_for(CredentialRejected("refused", result=result))
    assert problem is not None
    assert problem.extra == {"validation": result.to_json()}


def test_a_kind_without_a_row_takes_its_nearest_base() -> None:
    class QuotaExceeded(CredentialRejected):
        pass

    class NewCloudTrouble(CloudError):
        pass

    assert QuotaExceeded not in ERROR_ANSWERS
    assert problem_for(QuotaExceeded("q")) == Problem(422, exitcodes.FAILED, "q")
    assert problem_for(NewCloudTrouble("n")) == Problem(400, exitcodes.FAILED, "n")


def test_anything_else_is_not_answered() -> None:
    assert problem_for(ValueError("a bug")) is None
    assert problem_for(KeyError("x")) is None
    assert all(isinstance(a, HttpAnswer) for a in ERROR_ANSWERS.values())


@pytest.mark.parametrize(
    ("status", "body", "exit_code"),
    [
        # A cloud it cannot reach: the API says 69 with a 502; fedctl used to exit 1.
        (502, {"error": "unreachable", "exit_code": exitcodes.UNAVAILABLE}, exitcodes.UNAVAILABLE),
        (503, {"error": "no bus", "exit_code": exitcodes.UNAVAILABLE}, exitcodes.UNAVAILABLE),
        (400, {"error": "bad", "exit_code": exitcodes.USAGE}, exitcodes.USAGE),
        (422, {"error": "none fits", "exit_code": exitcodes.INFEASIBLE}, exitcodes.INFEASIBLE),
        (500, {"error": "internal error"}, exitcodes.FAILED),
        (400, {"error": "odd", "exit_code": 42}, exitcodes.FAILED),  # not one of fedsky's
        (413, None, exitcodes.FAILED),  # a body that was not JSON
    ],
)
def test_fedctl_exits_with_the_code_the_controller_gives(
    status: int, body: dict[str, object] | None, exit_code: int
) -> None:
    from fedsky.controller.cli.client import ApiError

    assert ApiError(status, "x", body).exit_code == exit_code
