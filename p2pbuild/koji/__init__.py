"""Koji integration: the dispatcher as a Koji build host that imports verified builds as a
content generator (design item 16). See ``docs/koji.md`` and ``dispatcher/koji-hub-setup.md``.

:func:`serve_koji_host` is started by :func:`p2pbuild.dispatcher.run_dispatcher` when the
configuration has a ``[koji]`` section. :func:`build_metadata` is the CG metadata mapping;
:func:`read_rpm_header` the RPM facts Koji checks.
"""

from ._cg import CG_VERSION, NodeProof, OutputFile, build_metadata, node_subdir
from ._host import (
    KojiHost,
    KojiHostStatistics,
    P2PBuildTask,
    P2POutcome,
    P2PTaskManager,
    serve_koji_host,
)
from ._rpm import RpmHeader, RpmHeaderError, read_rpm_header

__all__ = [
    "CG_VERSION",
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
    "node_subdir",
    "read_rpm_header",
    "serve_koji_host",
]
