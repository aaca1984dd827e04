"""The build subsystem's branch of the error tree.

:class:`BuildError` is the base of everything the executors raise on purpose. Like the rest
of p2pbuild the branch splits in two:

* :class:`BuildInputError` (also a :class:`~p2pbuild.RemoteError`): the job's input is bad,
  a source whose digest does not match, an archive that would escape its directory, an
  option outside the allow-list. The job came from a peer, so the daemon rejects the job,
  counts the ``code`` and carries on.
* :class:`BuildEnvironmentError` (also a :class:`~p2pbuild.LocalError`): this machine
  cannot build at all, e.g. ``bwrap`` is missing or may not create namespaces. That is an
  operator's problem and should stop the node from advertising the build type.

A build that runs and fails (non-zero exit, time limit, output or disk limit) is *not* an
exception: it is a :class:`~p2pbuild.node.BuildOutcome` with the matching state, because
the node still signs and reports it.
"""

from __future__ import annotations

from .._errors import LocalError, MalformedError, OversizeError, P2PBuildError, RemoteError

__all__ = [
    "ArchiveLimitError",
    "BadBuildSpecError",
    "BadMetadataError",
    "BuildrootError",
    "MissingBuildDependencyError",
    "PackageChecksumError",
    "PackageOutsideBuildrootError",
    "RepoChangedError",
    "RepoUnreachableError",
    "BadSourceError",
    "BuildEnvironmentError",
    "BuildError",
    "BuildInputError",
    "SourceDigestError",
    "UnsafeArchiveError",
]


class BuildError(P2PBuildError, code="build"):
    """Base of every error raised by the build executors."""


class BuildInputError(BuildError, RemoteError, code="bad-build-input"):
    """The job's input (source, archive, options) failed a check; reject the job."""


class SourceDigestError(BuildInputError, code="source-digest-mismatch"):
    """The source file's SHA-256 is not the one the job names."""


class BadSourceError(BuildInputError, MalformedError, code="bad-source"):
    """A source of the wrong kind (e.g. not a source RPM) or larger than allowed."""


class BadBuildSpecError(BuildInputError, MalformedError, code="bad-build-spec"):
    """A build option outside the allow-list or of the wrong shape."""


class UnsafeArchiveError(BuildInputError, MalformedError, code="unsafe-archive"):
    """A source archive that is not a tar.gz, or holds a member that would land outside the
    work directory (absolute path, ``..``, escaping link) or is a device, FIFO or socket."""


class ArchiveLimitError(UnsafeArchiveError, OversizeError, code="archive-limit"):
    """A source archive over the member-count or extracted-size bound (an archive bomb)."""


class BuildEnvironmentError(BuildError, LocalError, code="build-environment"):
    """This machine cannot run sandboxed builds (tool missing, namespaces not permitted)."""


class BuildrootError(BuildInputError, code="buildroot"):
    """The job's buildroot cannot be made: its repositories or packages failed a check.

    ``transient`` errors (an unreachable repository) are not the job's fault: the node
    hands the job back so the dispatcher tries it elsewhere; the others end it rejected.
    """

    transient = False


class RepoUnreachableError(BuildrootError, code="repo-unreachable"):
    """A repository (its ``repomd.xml``, metadata or a package) could not be fetched."""

    transient = True


class RepoChangedError(BuildrootError, code="repo-changed"):
    """A repository's ``repomd.xml`` no longer has the SHA-256 the job pinned."""


class BadMetadataError(BuildrootError, MalformedError, code="bad-repo-metadata"):
    """Repository metadata that is oversize, malformed, unsafe, or does not match the
    checksum ``repomd.xml`` gives for it."""


class PackageChecksumError(BuildrootError, code="package-checksum-mismatch"):
    """A downloaded package's size or SHA-256 is not what the repository metadata says."""


class MissingBuildDependencyError(BuildrootError, code="missing-build-dependency"):
    """No repository (and not the host base) provides something the build needs;
    ``dependency`` names it."""

    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(message or f"missing-build-dependency: {dependency}")
        self.dependency = dependency


class PackageOutsideBuildrootError(BuildrootError, code="package-outside-buildroot"):
    """A package would install a file outside the part of the buildroot a build sees
    (anything but ``/usr``), or under an unsafe name."""
