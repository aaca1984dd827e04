"""The node daemon: what a volunteer runs. So far, the sandboxed build executors."""

from ._archive import ExtractedTree, extract_tar_gz
from ._errors import (
    ArchiveLimitError,
    BadBuildSpecError,
    BadSourceError,
    BuildEnvironmentError,
    BuildError,
    BuildInputError,
    SourceDigestError,
    UnsafeArchiveError,
)
from ._executor import (
    BUILDHOST,
    MAKE_ARTIFACT_DIR,
    BuildOutcome,
    BuildSpec,
    BuildState,
    BuildType,
    Executor,
    ExecutorStatistics,
    Limits,
    OutputFile,
    Timings,
    rpm_macros,
    run_build,
)
from ._sandbox import LogSink, Sandbox

__all__ = [
    "BUILDHOST",
    "MAKE_ARTIFACT_DIR",
    "ArchiveLimitError",
    "BadBuildSpecError",
    "BadSourceError",
    "BuildEnvironmentError",
    "BuildError",
    "BuildInputError",
    "BuildOutcome",
    "BuildSpec",
    "BuildState",
    "BuildType",
    "Executor",
    "ExecutorStatistics",
    "ExtractedTree",
    "Limits",
    "LogSink",
    "OutputFile",
    "Sandbox",
    "SourceDigestError",
    "Timings",
    "UnsafeArchiveError",
    "extract_tar_gz",
    "rpm_macros",
    "run_build",
]
