"""The dispatcher's branch of the error tree.

As everywhere in p2pbuild the branch splits into what a peer or client did wrong
(:class:`~p2pbuild.RemoteError`: counted, the input dropped, never fatal) and what we got
wrong (:class:`~p2pbuild.LocalError`: a bug or a misconfiguration, propagates).

* :class:`NodeError` and its subclasses: a build node misbehaved or could not be reached.
  The node client (``_nodes.py``) is the one boundary where network and codec errors
  become these; the engine catches only this family, replaces the node and lowers its
  rating.
* :class:`NoCapableNodeError`: no node satisfies a build's constraints; its message names
  the constraint that failed, and ``constraint`` names it for machines.
* :class:`ClientError` and subclasses: a client's request to the dispatcher API is bad.
"""

from __future__ import annotations

from .._errors import LocalError, P2PBuildError, RemoteError

__all__ = [
    "ArtifactDigestError",
    "AuthenticationError",
    "BadNodeResultError",
    "BadRequestError",
    "BusyError",
    "ClientError",
    "ConfigError",
    "DispatcherError",
    "JobWithdrawnError",
    "LeaseExpiredError",
    "NoCapableNodeError",
    "NodeBusyError",
    "NodeError",
    "NodeRefusedError",
    "NodeTimeoutError",
    "NodeUnreachableError",
    "NodeVanishedError",
    "ResultMissingError",
    "SinkError",
    "SourceUnavailableError",
    "UnknownBuildError",
    "UnknownPullJobError",
]


class DispatcherError(P2PBuildError, code="dispatcher"):
    """Base of the errors the dispatcher raises on purpose."""


class NoCapableNodeError(DispatcherError, code="no-capable-node"):
    """No node satisfies the constraints. ``constraint`` is a short stable name of the one
    that failed (``arch``, ``os``, ``build-type``, ``operators``, ``pool-dedicated``, ...);
    the message says it for people, with counts."""

    def __init__(self, message: str, constraint: str) -> None:
        super().__init__(message)
        self.constraint = constraint


# -- nodes (remote) ----------------------------------------------------------------------------


class NodeError(DispatcherError, RemoteError, code="node-error"):
    """A build node failed us: unreachable, refused, or answered something wrong."""


class NodeUnreachableError(NodeError, code="node-unreachable"):
    """No HTTPS answer (connection refused, timeout, TLS pin mismatch, dropped stream)."""


class NodeBusyError(NodeError, code="node-busy", status=503):
    """The node has no free slot or is draining (HTTP 503); the job may be sent again."""


class NodeRefusedError(NodeError, code="node-refused"):
    """The node refused the job or a request for good (any other 4xx/5xx answer).

    ``status`` is the HTTP status and ``node_code`` the node's error code, e.g. ``replayed``.
    """

    def __init__(self, message: str, status: int, node_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.node_code = node_code


class NodeTimeoutError(NodeError, code="timed-out"):
    """The job did not finish within its time limit plus grace."""


class NodeVanishedError(NodeError, code="vanished"):
    """The node's records are gone from the directory while it had our job."""


class BadNodeResultError(NodeError, code="bad-result"):
    """A result that does not parse, is not signed by the node, or answers another job."""


class ArtifactDigestError(NodeError, code="artifact-digest-mismatch", status=422):
    """A downloaded artifact whose size or SHA-256 is not what the signed result says."""


class LeaseExpiredError(NodeError, code="lease-expired", status=410):
    """A pull node took the job and then did not renew its lease in time: the node is lost
    (killed, powered off, cut off). For the engine this is a node that stopped answering;
    for the node, a late request about the job is refused with this code."""


# -- clients (remote) --------------------------------------------------------------------------


class ClientError(DispatcherError, RemoteError, code="bad-request"):
    """A request to the dispatcher API that must be refused."""


class BadRequestError(ClientError):
    """A request that does not parse or names something out of bounds (its code is its
    base's, ``bad-request``)."""


class BusyError(ClientError, code="busy", status=503):
    """The dispatcher holds as many uploads in flight as it may (HTTP 503 with
    Retry-After); the same request may be sent again later."""


class AuthenticationError(ClientError, code="unauthenticated", status=401):
    """No valid token or signature, or a key not on the trust list."""


class UnknownBuildError(ClientError, code="unknown-build", status=404):
    """No build with that id on this dispatcher."""


class SourceUnavailableError(ClientError, code="source-unavailable"):
    """A build's source URL could not be fetched, or did not match its SHA-256."""


# -- pull-mode nodes asking about their jobs (remote) -------------------------------------


class UnknownPullJobError(ClientError, code="unknown-job", status=404):
    """No job with that id was taken by the asking node (never offered, or taken by another
    node)."""


class ResultMissingError(ClientError, code="no-result-yet", status=409):
    """A file upload before the signed result that names it."""


class JobWithdrawnError(ClientError, code="withdrawn", status=410):
    """The dispatcher withdrew the job (its build was cancelled, verified without it, or
    gave up on it): the node should stop building it and upload nothing."""


# -- local ---------------------------------------------------------------------------------------


class ConfigError(DispatcherError, LocalError, code="config"):
    """The dispatcher's configuration is invalid; the message is one line naming the key."""


class SinkError(DispatcherError, LocalError, code="sink"):
    """The repository directory cannot be written, or a stored file does not re-hash."""
