"""Koji integration: the dispatcher as a Koji build host that imports verified builds as a
content generator (design item 16). See ``docs/koji.md`` and ``dispatcher/koji-hub-setup.md``.

:func:`serve_koji_host` runs the host over a :class:`BuildService` (what the dispatcher
offers the roles above it); the wiring (``p2pbuild._wiring``) starts it next to the
dispatcher when the configuration has a ``[koji]`` section (:class:`KojiConfig`).
:func:`build_metadata` is the CG metadata mapping; :func:`read_rpm_header` the RPM facts
Koji checks. Needs the ``koji`` client: ``pip install 'p2pbuild[koji]'``.
"""

from ._cg import CG_VERSION, NodeProof, OutputFile, build_metadata, host_os, node_subdir
from ._config import KojiConfig, koji_config
from ._host import (
    KojiHost,
    KojiHostStatistics,
    P2PBuildTask,
    P2POutcome,
    P2PTaskManager,
    serve_koji_host,
)
from ._rpm import RpmHeader, RpmHeaderError, read_rpm_header
from ._service import BuildService

__all__ = [
    "CG_VERSION",
    "BuildService",
    "KojiConfig",
    "KojiHost",
    "KojiHostStatistics",
    "NodeProof",
    "OutputFile",
    "P2PBuildTask",
    "P2POutcome",
    "P2PTaskManager",
    "RpmHeader",
    "RpmHeaderError",
    "build_metadata",
    "host_os",
    "koji_config",
    "node_subdir",
    "read_rpm_header",
    "serve_koji_host",
]
