"""Who may do what with a build on the dispatcher's API: the caller, ownership, redaction.

A build belongs to the user who submitted it. Changing it (cancel, and any future write) is
allowed to its owner and to admins (``role = "admin"`` in a ``[[clients]]`` entry, or a
maintainer of the trust list); anyone else gets :class:`~p2pbuild.ForbiddenError` (403) with
a one-line reason, and nothing changes.

Reading stays open to every authenticated user, as Koji and Copr show builds publicly: a
build's state, source, target, outcome, attempts (node, operator, state, reason) and audit
events. What is operational data is shown to admins only and removed for everyone else
(:data:`OPERATIONAL_KEYS`): the nodes' job ids and endpoints. A job id is what a node's job
routes are addressed by; with an endpoint it told any user where to reach a running job.

Pure functions over JSON bodies; ``docs/dispatcher.md`` ("Who may do what") says the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import ForbiddenError
from ._db import BuildRow

__all__ = [
    "OPERATIONAL_KEYS",
    "Caller",
    "check_may_change",
    "redact_build",
    "redact_event",
    "redact_node",
]

#: Keys of attempts, audit events and node rows that only admins see.
OPERATIONAL_KEYS = frozenset({"job_id", "endpoint", "tls_sha256"})


@attrs.frozen
class Caller:
    """An authenticated API user: the name builds are owned by, a team, and whether the
    user is an admin of this dispatcher."""

    user: str
    team: str | None = None
    admin: bool = False


def check_may_change(caller: Caller, build: BuildRow, action: str = "cancel") -> None:
    """Raise :class:`~p2pbuild.ForbiddenError` unless ``caller`` owns ``build`` or is an
    admin."""
    if caller.admin or caller.user == build.user:
        return
    raise ForbiddenError(
        f"build {build.id} belongs to {build.user}; only its owner or an admin may {action} it"
    )


def _strip(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key not in OPERATIONAL_KEYS}


def redact_event(event: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
    """An audit event's JSON as ``caller`` may see it."""
    if caller.admin:
        return dict(event)
    body = dict(event)
    if isinstance(body.get("detail"), Mapping):
        body["detail"] = _strip(body["detail"])
    return body


def redact_build(body: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
    """A build's JSON (with ``attempts`` and ``events``) as ``caller`` may see it."""
    if caller.admin:
        return dict(body)
    shown = dict(body)
    if "attempts" in shown:
        shown["attempts"] = [_strip(a) for a in shown["attempts"]]
    if "events" in shown:
        shown["events"] = [redact_event(e, caller) for e in shown["events"]]
    return shown


def redact_node(row: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
    """A row of the node table as ``caller`` may see it."""
    return dict(row) if caller.admin else _strip(row)
