"""The dispatcher: finds trusted nodes in the DHT, sends signed jobs to nodes of different
operators, verifies that their outputs agree bit for bit, and stores verified builds.

Layers: pure selection (:func:`select_nodes`), rating model (:class:`RatingBook`),
verification (:func:`assess`), SQLite state (:class:`Database`), the trio build engine
(:class:`Engine`), the repository sink (:class:`RepositorySink`), the HTTPS API and the
service (:func:`run_dispatcher`). See ``docs/dispatcher.md``.
"""

from ._api import ApiAuth, make_dispatcher_app, sign_request
from ._builds import BuildStatus, EngineBuildService, SourceChangedError
from ._config import ClientEntry, DispatcherConfig, hash_token, load_config
from ._db import AttemptState, BuildRow, BuildState, Database
from ._engine import BuildRequest, Engine, EngineConfig, EngineStatistics, SourceStore
from ._errors import (
    ArtifactDigestError,
    AuthenticationError,
    BadNodeResultError,
    BadRequestError,
    ClientError,
    ConfigError,
    DispatcherError,
    NoCapableNodeError,
    NodeBusyError,
    NodeError,
    NodeRefusedError,
    NodeUnreachableError,
    SinkError,
    SourceUnavailableError,
    UnknownBuildError,
)
from ._nodes import DirectoryFinder, NodeConnector, NodeFinder, PushNodeClient, StaticFinder
from ._pull import PullQueue
from ._pull_routes import pull_routes, serve_pull
from ._ratings import NodeRating, RatingBook, RatingModel
from ._request import buildroot_from_json
from ._select import Candidate, Platform, Requirements, select_nodes
from ._service import RunningDispatcher, run_dispatcher
from ._sink import RepositorySink
from ._stored import StoredBuild, StoredFile, StoredProof
from ._verify import Replica, Verified, assess, difference_report
from ._web import WebView, web_routes

__all__ = [
    "ApiAuth",
    "ArtifactDigestError",
    "AttemptState",
    "AuthenticationError",
    "BadNodeResultError",
    "BadRequestError",
    "BuildRequest",
    "BuildRow",
    "BuildState",
    "BuildStatus",
    "Candidate",
    "ClientEntry",
    "ClientError",
    "ConfigError",
    "Database",
    "DirectoryFinder",
    "DispatcherConfig",
    "DispatcherError",
    "Engine",
    "EngineBuildService",
    "EngineConfig",
    "EngineStatistics",
    "NoCapableNodeError",
    "NodeBusyError",
    "NodeConnector",
    "NodeError",
    "NodeFinder",
    "NodeRating",
    "NodeRefusedError",
    "NodeUnreachableError",
    "Platform",
    "PullQueue",
    "PushNodeClient",
    "RatingBook",
    "RatingModel",
    "Replica",
    "RepositorySink",
    "Requirements",
    "RunningDispatcher",
    "SinkError",
    "SourceChangedError",
    "SourceStore",
    "SourceUnavailableError",
    "StaticFinder",
    "StoredBuild",
    "StoredFile",
    "StoredProof",
    "UnknownBuildError",
    "Verified",
    "WebView",
    "assess",
    "difference_report",
    "hash_token",
    "load_config",
    "make_dispatcher_app",
    "pull_routes",
    "run_dispatcher",
    "select_nodes",
    "serve_pull",
    "sign_request",
    "buildroot_from_json",
    "web_routes",
]
