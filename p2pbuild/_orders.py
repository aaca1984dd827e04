"""Short signed orders between a dispatcher and a node, next to the jobs they are about.

Every short order is a :class:`SignedOrder`: the fields its type declares, a time and a
random nonce, signed by one key in the type's domain. The types:

* :class:`PullAuth`, a node's proof of identity when it long-polls a dispatcher
  (``Domain.PULL_AUTH``, at most :data:`MAX_PULL_AUTH_SIZE`)::

      [1, node(bin32), dispatcher(bin32), issued_at, nonce(bin16), signature(bin64)]

* :class:`JobControl`, a dispatcher's order to a node about one job it issued: stop it, or
  forget a finished one with its files (``Domain.JOB_CONTROL``, at most
  :data:`MAX_JOB_CONTROL_SIZE`)::

      [1, dispatcher(bin32), job_id(bin16), action, issued_at, nonce(bin16), signature(bin64)]

* a :class:`NodeOrder`, a trust-listed dispatcher's order to one node:
  :class:`~p2pbuild._wake.WakeRequest` and :class:`~p2pbuild._hold.LeaseHold`.

Encoded, signed and checked as the jobs of ``_jobs.py`` are (its field checks are shared).
This module is core: no I/O, no clock reads, no trio.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar, Self

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
    require_dispatcher,
    sign_array,
)
from ._identity import Domain, Identity, PublicKey, Role
from ._jobs import DEFAULT_JOB_POLICY, ID_SIZE, Job, JobPolicy
from ._replay import ReplayCache
from ._trust import TrustList

__all__ = [
    "MAX_JOB_CONTROL_SIZE",
    "MAX_PULL_AUTH_SIZE",
    "ORDER_WINDOW_S",
    "JobControl",
    "JobControlAction",
    "NodeOrder",
    "PullAuth",
    "SignedOrder",
    "Wire",
]

MAX_PULL_AUTH_SIZE = 256
MAX_JOB_CONTROL_SIZE = 256
#: A :class:`NodeOrder` is fresh this long either side of its ``issued_at`` (seconds).
ORDER_WINDOW_S = 60


# -- the signed order -------------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


@attrs.frozen
class Wire:
    """How a field of a :class:`SignedOrder` stands on the wire.

    ``check(wire_value, field_name)`` returns the field's value or raises
    :class:`MalformedError` naming the field; ``encode`` is its inverse (the value itself
    by default). A field carries it as ``attrs.field(metadata=Wire(...).metadata)``.
    """

    check: Callable[[Any, str], Any]
    encode: Callable[[Any], Any] = _same

    @property
    def metadata(self) -> dict[str, Wire]:
        return {"wire": self}


def _check_key(value: object, name: str) -> PublicKey:
    return PublicKey(_require_bytes(value, 32, name))


def _key_bytes(key: PublicKey) -> bytes:
    return key.raw


#: A public key, as its 32 raw bytes.
KEY = Wire(_check_key, _key_bytes).metadata
#: A time in Unix seconds.
TIME = Wire(_require_time).metadata


def _check_nonce(value: object, name: str) -> bytes:
    return _require_bytes(value, NONCE_SIZE, name)


@attrs.frozen
class SignedOrder:
    """A short order signed by one key; build with :meth:`create` on a subclass, parse with
    :meth:`from_bytes` (authenticates), accept with the subclass's ``check``.

    A subclass declares its fields in wire order, each with its :class:`Wire` form as the
    field's metadata, and names as class keywords its signing ``domain``, its ``max_size``
    in bytes, ``what`` it is called in errors, and the field that holds the ``signer``'s key
    (``dispatcher`` unless it says otherwise). Its wire form (canonical msgpack) is::

        [1, *the declared fields, issued_at, nonce(bin16), signature(bin64)]

    signed over all but the signature, as an array, with the signer's key.
    """

    _domain: ClassVar[Domain]
    _max_size: ClassVar[int]
    _what: ClassVar[str]
    _signer: ClassVar[str] = "dispatcher"
    #: (field name, wire form), in wire order; set for each subclass.
    _layout: ClassVar[tuple[tuple[str, Wire], ...]] = ()

    issued_at: int = attrs.field(kw_only=True)
    nonce: bytes = attrs.field(kw_only=True)
    signature: bytes = attrs.field(kw_only=True, repr=False)
    #: The exact wire bytes.
    raw: bytes = attrs.field(kw_only=True, repr=False, eq=False)

    def __init_subclass__(
        cls,
        *,
        domain: Domain | None = None,
        max_size: int | None = None,
        what: str | None = None,
        signer: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        # attrs makes each slotted class anew, which runs this again without the keywords.
        given = {"_domain": domain, "_max_size": max_size, "_what": what, "_signer": signer}
        for name, value in given.items():
            if value is not None:
                setattr(cls, name, value)

    @classmethod
    def _wire_layout(cls) -> tuple[tuple[str, Wire], ...]:
        # Computed once a class: attrs fills in the fields only after the class body (and
        # __init_subclass__) ran.
        if "_layout" not in cls.__dict__:
            declared = [
                (field.name, field.metadata["wire"])
                for field in attrs.fields(cls)
                if "wire" in field.metadata
            ]
            cls._layout = (
                *declared,
                ("issued_at", Wire(_require_time)),
                ("nonce", Wire(_check_nonce)),
            )
        return cls._layout

    @classmethod
    def _sign(
        cls, identity: Identity, *, issued_at: int, nonce: bytes | None, **fields: Any
    ) -> Self:
        """Sign ``fields`` as ``identity`` (the signer); ``nonce`` defaults to random.

        Every field is checked as a receiver checks it: :class:`MalformedError` for a
        field it would refuse, :class:`OversizeError` past the size bound.
        """
        nonce = fresh_nonce(nonce, issued_at)
        values = {**fields, cls._signer: identity.public_key, "issued_at": issued_at}
        values["nonce"] = nonce
        elements = []
        for name, wire in cls._wire_layout():
            element = wire.encode(values[name])
            wire.check(element, name)
            elements.append(element)
        signature, raw = sign_array(identity, cls._domain, elements, cls._max_size)
        make: Callable[..., Self] = cls
        return make(**values, signature=signature, raw=raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse and authenticate an order.

        Raises :class:`OversizeError`, :class:`MalformedError` or :class:`BadSignatureError`.
        """
        layout = cls._wire_layout()
        size = len(layout) + 2
        value = _split_signed(data, cls._max_size, size, cls._what)
        items = zip(layout, value[1:-1], strict=True)
        values = {name: wire.check(item, name) for (name, wire), item in items}
        signer: PublicKey = values[cls._signer]
        signer.verify(cls._domain, _signed_part(data, size), value[-1])
        make: Callable[..., Self] = cls
        return make(**values, signature=value[-1], raw=data)

    def to_bytes(self) -> bytes:
        return self.raw

    def _spend(self, now: float, window: int, seen: ReplayCache) -> None:
        """Record the nonce in ``seen`` for as long as the order is fresh (single use);
        :class:`ReplayError` if it is there already."""
        signer: PublicKey = getattr(self, self._signer)
        seen.add(signer.raw + self.nonce, self.issued_at + window + 1, now)


@attrs.frozen
class NodeOrder(SignedOrder):
    """A trust-listed dispatcher's signed order to one ``node``."""

    dispatcher: PublicKey = attrs.field(metadata=KEY)
    node: PublicKey = attrs.field(metadata=KEY)

    def check(
        self,
        now: float,
        node: PublicKey,
        trust_list: TrustList,
        seen: ReplayCache,
        *,
        window: int = ORDER_WINDOW_S,
    ) -> None:
        """Accept the order at ``now`` as ``node``, recording its nonce in ``seen``.

        Raises :class:`WrongNodeError` (for another node), :class:`ForbiddenError` (not
        signed by a trust-listed dispatcher), :class:`ExpiredError`,
        :class:`NotYetValidError` or :class:`ReplayError`.
        """
        if self.node != node:
            raise WrongNodeError(f"the {self._what} is for another node")
        require_dispatcher(trust_list, self.dispatcher, self._what)
        check_window(now, self.issued_at, window, self._what)
        self._spend(now, window, seen)


# -- pull-mode auth ---------------------------------------------------------------------------


@attrs.frozen
class PullAuth(
    SignedOrder,
    domain=Domain.PULL_AUTH,
    max_size=MAX_PULL_AUTH_SIZE,
    what="pull token",
    signer="node",
):
    """A node's signed proof of identity for one long-poll request to one dispatcher.

    Valid for :attr:`JobPolicy.pull_auth_window` seconds either side of ``issued_at``, and
    once: the dispatcher remembers the nonce.
    """

    node: PublicKey = attrs.field(metadata=KEY)
    dispatcher: PublicKey = attrs.field(metadata=KEY)

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
        return cls._sign(identity, dispatcher=dispatcher, issued_at=issued_at, nonce=nonce)

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
        self._spend(now, window, seen)


# -- job control ------------------------------------------------------------------------------


class JobControlAction(enum.StrEnum):
    """What a :class:`JobControl` orders."""

    #: Stop a running job (it ends ``cancelled``), or forget a finished one with its files.
    DELETE = "delete"


def _check_job_id(value: object, name: str) -> bytes:
    return _require_bytes(value, ID_SIZE, name)


def _check_action(value: object, name: str) -> JobControlAction:
    if type(value) is str:
        try:
            return JobControlAction(value)
        except ValueError:
            pass
    raise MalformedError("unknown job control action")


@attrs.frozen
class JobControl(
    SignedOrder, domain=Domain.JOB_CONTROL, max_size=MAX_JOB_CONTROL_SIZE, what="job control"
):
    """A dispatcher's signed order about one job it issued (``DELETE /v1/jobs/<id>`` on a
    node carries one). Like :class:`PullAuth` it is fresh for
    :attr:`JobPolicy.pull_auth_window` seconds either side of ``issued_at`` and single-use
    (the node remembers the nonce); it names the job, so it cannot be aimed at another.
    """

    dispatcher: PublicKey = attrs.field(metadata=KEY)
    job_id: bytes = attrs.field(metadata=Wire(_check_job_id).metadata)
    action: JobControlAction = attrs.field(metadata=Wire(_check_action, str).metadata)

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
        action = JobControlAction(action)
        return cls._sign(identity, job_id=job_id, action=action, issued_at=issued_at, nonce=nonce)

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
        self._spend(now, window, seen)
