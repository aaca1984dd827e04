"""The node daemon: what a volunteer runs. The sandboxed build executors, and the daemon
around them: configuration, capability detection, persistent state, the HTTPS job API,
pull mode and :func:`run_node`."""

# The sandboxed build executors, with their errors (every public name of _executor and
# _errors, see the end), and the daemon: configuration, detection, state, job service and
# API, pull mode.
from ..https import (
    CertificatePinError,
    TlsMaterial,
    generate_tls_material,
    load_tls_material,
    pinned_client,
)
from . import _errors, _executor
from ._api import NodeApiConfig, make_app, serve_node_api
from ._archive import ExtractedTree, extract_tar_gz
from ._buildroot import BuildrootCache, BuildrootStep, PreparedBuildroot, fetch_https
from ._config import (
    ApiConfig,
    CapabilityOverrides,
    ConfigBounds,
    ConfigError,
    DhtSettings,
    NodeConfig,
    NodeLimits,
    PullDispatcher,
    PullSettings,
    load_config,
    parse_config,
    render_config,
)
from ._daemon import NodeDaemon, load_trust_file, run_node
from ._detect import Detected, HostProbe, apply_overrides, detect
from ._errors import *  # noqa: F403
from ._executor import *  # noqa: F403
from ._hostbase import HOST_PACKAGE, HostFacts, gather_host_facts
from ._pull import PullClient
from ._repodata import Dep, MetadataLimits
from ._runner import ExecutorRunner, fetch_source_https
from ._sandbox import LogSink, Sandbox
from ._service import (
    DrainingError,
    JobFilter,
    JobRunner,
    JobService,
    JobServiceStatistics,
    JobStatus,
    JobStore,
    NoFreeSlotError,
    RunReport,
    UnavailableError,
    UnknownJobError,
    UnservableJobError,
)
from ._state import NodeState, StateError, StoredJob

__all__ = [
    "BuildrootCache",
    "BuildrootStep",
    "PreparedBuildroot",
    "fetch_https",
    "HOST_PACKAGE",
    "HostFacts",
    "gather_host_facts",
    "Dep",
    "MetadataLimits",
    "ExtractedTree",
    "LogSink",
    "Sandbox",
    "extract_tar_gz",
    # the daemon
    "ApiConfig",
    "CapabilityOverrides",
    "CertificatePinError",
    "ConfigBounds",
    "ConfigError",
    "Detected",
    "DhtSettings",
    "DrainingError",
    "ExecutorRunner",
    "HostProbe",
    "JobFilter",
    "JobRunner",
    "JobService",
    "JobServiceStatistics",
    "JobStatus",
    "JobStore",
    "NoFreeSlotError",
    "NodeApiConfig",
    "NodeConfig",
    "NodeDaemon",
    "NodeLimits",
    "NodeState",
    "PullClient",
    "PullDispatcher",
    "PullSettings",
    "RunReport",
    "StateError",
    "StoredJob",
    "TlsMaterial",
    "UnavailableError",
    "UnknownJobError",
    "UnservableJobError",
    "apply_overrides",
    "detect",
    "fetch_source_https",
    "generate_tls_material",
    "load_config",
    "load_tls_material",
    "load_trust_file",
    "make_app",
    "parse_config",
    "pinned_client",
    "render_config",
    "run_node",
    "serve_node_api",
]
# The executors and their errors export all they define.
__all__ += _errors.__all__
__all__ += _executor.__all__
