"""Every error class carries its HTTP status; a refusal is one line of JSON with it."""

from __future__ import annotations

import json

import pytest

from p2pbuild import (
    BadSignatureError,
    ExpiredError,
    ForbiddenError,
    LocalError,
    MalformedError,
    NotYetValidError,
    OversizeError,
    P2PBuildError,
    ReplayError,
    UntrustedKeyError,
    WrongNodeError,
)
from p2pbuild.dispatcher._errors import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    JobWithdrawnError,
    LeaseExpiredError,
    UnknownBuildError,
)
from p2pbuild.https import RequestTimeoutError, refusal
from p2pbuild.node._api import ControlAuthError
from p2pbuild.node._service import (
    JobRunningError,
    NoFreeSlotError,
    SourceTooLargeError,
    UnknownJobError,
    UnservableJobError,
)


@pytest.mark.parametrize(("error", "status"), [
    (MalformedError("x"), 400), (NotYetValidError("x"), 400), (OversizeError("x"), 413),
    (BadSignatureError("x"), 401), (UntrustedKeyError("x"), 401), (ControlAuthError("x"), 401),
    (AuthenticationError("x"), 401), (ForbiddenError("x"), 403), (UnknownJobError("x"), 404),
    (UnknownBuildError("x"), 404), (RequestTimeoutError("x"), 408), (ReplayError("x"), 409),
    (JobRunningError("x"), 409), (ExpiredError("x"), 410), (JobWithdrawnError("x"), 410),
    (LeaseExpiredError("x"), 410), (WrongNodeError("x"), 421), (UnservableJobError("x"), 422),
    (SourceTooLargeError("x"), 422), (BadRequestError("x"), 400), (NoFreeSlotError("x"), 503),
    (BusyError("x"), 503), (LocalError("x"), 500), (P2PBuildError("x"), 500),
])
def test_each_error_refuses_with_its_own_status(error: P2PBuildError, status: int) -> None:
    response = refusal(error)
    assert response.status_code == status == error.http_status
    assert json.loads(response.body) == {"error": error.code, "reason": "x"}
    assert ("retry-after" in response.headers) == (status == 503)


def test_a_refusal_is_one_line_and_bounded() -> None:
    body = json.loads(refusal(MalformedError("a\nb" * 500), constraint="arch").body)
    assert body["error"] == "malformed" and body["constraint"] == "arch"
    assert "\n" not in body["reason"] and len(body["reason"]) == 300
