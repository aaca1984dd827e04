"""Settling a Koji task's reservation on the hub, and a task's recorded outcome.

What the build host does with the hub's side of a task when it cannot simply carry on:
refund a reservation it holds (and find out whether the hub has it refunded, imported or
still open when the refund's answer is lost), cancel a reservation whose token it never
received (``CGInitBuild`` answered, then the host died before storing the answer), and
turn a task's end into a recordable outcome and back into the exception that
``TaskManager.runTask`` reports (``failTask``, ``refuseTask``).

Every function here makes blocking hub calls; they run in the host's worker threads.
"""

from __future__ import annotations

import logging
import xmlrpc.client
from collections.abc import Callable, Mapping
from typing import Any, cast

import koji
import koji.tasks
import requests

from ._store import TaskRow

__all__ = [
    "HUB_ERRORS",
    "TaskCancelled",
    "hub_build_state",
    "outcome_error",
    "outcome_of",
    "recover_lost_reservation",
    "refund",
]

_log = logging.getLogger("p2pbuild.koji")

#: What a failed hub call may raise: Koji faults (also AuthError, ServerOffline), raw
#: XML-RPC faults and the network errors the client gives up on.
HUB_ERRORS = (koji.GenericError, xmlrpc.client.Fault, requests.exceptions.RequestException,
              OSError)

BUILDING = koji.BUILD_STATES["BUILDING"]
COMPLETE = koji.BUILD_STATES["COMPLETE"]
FAILED = koji.BUILD_STATES["FAILED"]
CANCELED = koji.BUILD_STATES["CANCELED"]


class TaskCancelled(koji.GenericError):  # type: ignore[misc]
    """The task was cancelled in Koji while its P2P build ran."""


def outcome_of(exc: BaseException) -> dict[str, Any]:
    """How a task ended, as :meth:`TaskStore.refunded` records it."""
    if isinstance(exc, koji.tasks.RefuseTask):
        return {"kind": "refuse", "code": 0, "message": str(exc)}
    if isinstance(exc, TaskCancelled):
        return {"kind": "cancel", "code": exc.faultCode, "message": str(exc)}
    if isinstance(exc, koji.GenericError | xmlrpc.client.Fault):
        code = int(getattr(exc, "faultCode", 1))
        message = exc.faultString if isinstance(exc, xmlrpc.client.Fault) else str(exc)
        return {"kind": "fail", "code": code, "message": message}
    return {"kind": "fail", "code": 1, "message": f"{type(exc).__name__}: {exc}"}


def outcome_error(outcome: Mapping[str, Any]) -> Exception:
    """The exception that makes ``runTask`` report ``outcome`` again (after a restart)."""
    kind, message = outcome.get("kind"), str(outcome.get("message", ""))
    if kind == "refuse":
        refusal: Exception = koji.tasks.RefuseTask(message)
        return refusal
    if kind == "cancel":
        return TaskCancelled(message)
    fault = xmlrpc.client.Fault(int(outcome.get("code", 1)), message)
    return cast(Exception, koji.convertFault(fault))


def hub_build_state(session: koji.ClientSession, build_id: int) -> int | None:
    """The Koji build's state, None if the hub does not know it. Raises HUB_ERRORS."""
    info = session.getBuild(build_id)
    return None if not info else int(info["state"])


def refund(session: koji.ClientSession, cg: str, row: TaskRow, state: int) -> bool:
    """Refund the reservation ``row`` holds as ``state`` (FAILED or CANCELED).

    True once the hub confirms the reservation is closed: refunded now, or already
    refunded or cancelled (an earlier attempt's refund whose answer was lost, or
    ``koji cancel`` on the build), or no longer ours (the hub refused our token for a
    build that is reserved again). False when that is not known (the hub is away) or the
    build is imported: the caller keeps the row and tries again later. Never raises
    for the hub's sake.
    """
    assert row.build_id is not None and row.token is not None, row
    refused = False
    try:
        session.CGRefundBuild(cg, row.build_id, row.token, state)
        return True
    except HUB_ERRORS as exc:
        # A plain GenericError (1000) is the hub's own answer to the refund ("Token
        # doesn't match", "not in BUILDING state"); its subclasses (offline, auth) and
        # network errors say nothing about the reservation.
        refused = type(exc) is koji.GenericError
        _log.warning("koji task %d: refund of build %d: %s", row.task_id, row.build_id, exc)
    try:
        current = hub_build_state(session, row.build_id)
    except HUB_ERRORS as exc:
        _log.warning("koji task %d: state of build %d unknown: %s", row.task_id, row.build_id,
                     exc)
        return False
    if current == COMPLETE:
        return False
    return refused or current in (FAILED, CANCELED, None)


def recover_lost_reservation(
    session: koji.ClientSession, cg: str, host_user: str, row: TaskRow,
    holder: Callable[[int], int | None],
) -> int | None:
    """Cancel the reservation of ``row``'s NVR that this host made and never learned the
    token of; returns its build id, or None if there is none.

    Ours means: ``BUILDING``, reserved by our content generator, owned by the host's user,
    not tied to another task, and held by no other row of the store (``holder``: build id
    -> task id). The hub lets the owner cancel it (``cancelBuild``), which also drops the
    reservation; the NVR can then be reserved again. Raises HUB_ERRORS.
    """
    info = session.getBuild(row.nvr)
    if not info or info["state"] != BUILDING:
        return None
    if (info.get("cg_name") != cg or info.get("owner_name") != host_user
            or info.get("task_id") not in (None, row.task_id)):
        return None
    build_id = int(info["id"])
    if holder(build_id) not in (None, row.task_id):
        return None
    _log.warning("koji task %d: cancelling build %d (%s), reserved by an attempt whose "
                 "token was lost", row.task_id, build_id, row.nvr)
    session.cancelBuild(build_id)
    return build_id
