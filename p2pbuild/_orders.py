"""Short signed orders between a dispatcher and a node, next to the jobs they are about.

* :class:`PullAuth`, a node's proof of identity when it long-polls a dispatcher
  (``Domain.PULL_AUTH``, at most :data:`MAX_PULL_AUTH_SIZE`)::

      [1, node(bin32), dispatcher(bin32), issued_at, nonce(bin16), signature(bin64)]

* :class:`JobControl`, a dispatcher's order to a node about one job it issued: stop it, or
  forget a finished one with its files (``Domain.JOB_CONTROL``, at most
  :data:`MAX_JOB_CONTROL_SIZE`)::

      [1, dispatcher(bin32), job_id(bin16), action, issued_at, nonce(bin16), signature(bin64)]

Encoded, signed and checked as the jobs of ``_jobs.py`` are (its field checks are shared).
This module is core: no I/O, no clock reads, no trio.
"""

from __future__ import annotations

import enum

import attrs

from ._errors import ForbiddenError, MalformedError, WrongNodeError
from ._fields import (
    NONCE_SIZE,
    _require_bytes,
    _require_time,
    _signed_part,
    _split_signed,
    check_window,
    fresh_nonce,
    sign_array,
)
from ._identity import Domain, Identity, PublicKey, Role
from ._jobs import DEFAULT_JOB_POLICY, ID_SIZE, Job, JobPolicy
from ._replay import ReplayCache
from ._trust import TrustList

__all__ = [
    "MAX_JOB_CONTROL_SIZE",
    "MAX_PULL_AUTH_SIZE",
    "JobControl",
    "JobControlAction",
    "PullAuth",
]

MAX_PULL_AUTH_SIZE = 256
MAX_JOB_CONTROL_SIZE = 256


# -- pull-mode auth ---------------------------------------------------------------------------


@attrs.frozen
class PullAuth:
    """A node's signed proof of identity for one long-poll request to one dispatcher.

    Valid for :attr:`JobPolicy.pull_auth_window` seconds either side of ``issued_at``, and
    once: the dispatcher remembers the nonce.
    """

    node: PublicKey
    dispatcher: PublicKey
    issued_at: int
    nonce: bytes
    signature: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False, eq=False)

    @classmethod
    def create(
        cls,
        identity: Identity,
        dispatcher: PublicKey,
        *,
        issued_at: int,
        nonce: bytes | None = None,
    ) -> PullAuth:
        """Sign a token for ``dispatcher`` as node ``identity``; ``nonce`` defaults to random."""
        nonce = fresh_nonce(nonce, issued_at)
        signature, raw = sign_array(
            identity, Domain.PULL_AUTH,
            [identity.public_key.raw, dispatcher.raw, issued_at, nonce], MAX_PULL_AUTH_SIZE,
        )
        return cls(identity.public_key, dispatcher, issued_at, nonce, signature, raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> PullAuth:
        """Parse and authenticate a token.

        Raises :class:`OversizeError`, :class:`MalformedError` or :class:`BadSignatureError`.
        """
        value = _split_signed(data, MAX_PULL_AUTH_SIZE, 6, "pull token")
        _, node, dispatcher, issued_at, nonce, signature = value
        node_key = PublicKey(_require_bytes(node, 32, "node"))
        dispatcher_key = PublicKey(_require_bytes(dispatcher, 32, "dispatcher"))
        _require_time(issued_at, "issued_at")
        _require_bytes(nonce, NONCE_SIZE, "nonce")
        node_key.verify(Domain.PULL_AUTH, _signed_part(data, 6), signature)
        return cls(node_key, dispatcher_key, issued_at, nonce, signature, data)

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self,
        now: float,
        trust_list: TrustList,
        dispatcher_key: PublicKey,
        seen: ReplayCache,
        *,
        policy: JobPolicy = DEFAULT_JOB_POLICY,
    ) -> None:
        """Check the token at dispatcher ``dispatcher_key`` at time ``now``, and record its
        nonce in ``seen`` (a token is single-use).

        Raises :class:`ExpiredError` (older than the window), :class:`NotYetValidError`
        (newer than the window), :class:`WrongNodeError` (meant for another dispatcher),
        :class:`UntrustedKeyError` (the signer is not a node on ``trust_list``) or
        :class:`ReplayError`.
        """
        window = policy.pull_auth_window
        check_window(now, self.issued_at, window, "pull token")
        if self.dispatcher != dispatcher_key:
            raise WrongNodeError("pull token is for another dispatcher")
        trust_list.require(self.node, Role.NODE)
        seen.add(self.node.raw + self.nonce, self.issued_at + window + 1, now)


# -- job control ------------------------------------------------------------------------------


class JobControlAction(enum.StrEnum):
    """What a :class:`JobControl` orders."""

    #: Stop a running job (it ends ``cancelled``), or forget a finished one with its files.
    DELETE = "delete"


@attrs.frozen
class JobControl:
    """A dispatcher's signed order about one job it issued (``DELETE /v1/jobs/<id>`` on a
    node carries one). Like :class:`PullAuth` it is fresh for
    :attr:`JobPolicy.pull_auth_window` seconds either side of ``issued_at`` and single-use
    (the node remembers the nonce); it names the job, so it cannot be aimed at another.
    """

    dispatcher: PublicKey
    job_id: bytes
    action: JobControlAction
    issued_at: int
    nonce: bytes
    signature: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False, eq=False)

    @classmethod
    def create(
        cls,
        identity: Identity,
        job_id: bytes,
        action: JobControlAction,
        *,
        issued_at: int,
        nonce: bytes | None = None,
    ) -> JobControl:
        """Sign ``action`` on ``job_id`` as dispatcher ``identity``; ``nonce`` defaults to
        random."""
        nonce = fresh_nonce(nonce, issued_at)
        _require_bytes(job_id, ID_SIZE, "job_id")
        action = JobControlAction(action)
        signature, raw = sign_array(
            identity, Domain.JOB_CONTROL,
            [identity.public_key.raw, job_id, action.value, issued_at, nonce],
            MAX_JOB_CONTROL_SIZE,
        )
        return cls(identity.public_key, job_id, action, issued_at, nonce, signature, raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> JobControl:
        """Parse and authenticate an order.

        Raises :class:`OversizeError`, :class:`MalformedError` or :class:`BadSignatureError`.
        """
        value = _split_signed(data, MAX_JOB_CONTROL_SIZE, 7, "job control")
        _, dispatcher, job_id, action, issued_at, nonce, signature = value
        dispatcher_key = PublicKey(_require_bytes(dispatcher, 32, "dispatcher"))
        _require_bytes(job_id, ID_SIZE, "job_id")
        try:
            parsed = JobControlAction(action) if type(action) is str else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise MalformedError("unknown job control action")
        _require_time(issued_at, "issued_at")
        _require_bytes(nonce, NONCE_SIZE, "nonce")
        dispatcher_key.verify(Domain.JOB_CONTROL, _signed_part(data, 7), signature)
        return cls(dispatcher_key, job_id, parsed, issued_at, nonce, signature, data)

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self,
        now: float,
        job: Job,
        action: JobControlAction,
        seen: ReplayCache,
        *,
        policy: JobPolicy = DEFAULT_JOB_POLICY,
    ) -> None:
        """Check the order against the ``job`` it must be about at time ``now``, and record
        its nonce in ``seen`` (an order is single-use).

        Raises :class:`ForbiddenError` (signed by another key than the job's dispatcher,
        about another job, or ordering another action), :class:`ExpiredError`,
        :class:`NotYetValidError` or :class:`ReplayError`.
        """
        if self.dispatcher != job.dispatcher:
            raise ForbiddenError("only the dispatcher that issued a job may control it")
        if self.job_id != job.job_id:
            raise ForbiddenError("the order is about another job")
        if self.action is not action:
            raise ForbiddenError(f"the order is for {self.action.value}, not {action.value}")
        window = policy.pull_auth_window
        check_window(now, self.issued_at, window, "job control order")
        seen.add(self.dispatcher.raw + self.nonce, self.issued_at + window + 1, now)
