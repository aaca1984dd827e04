"""What the Koji build host needs from the dispatcher: a narrow build service.

The dispatcher implements it (:class:`p2pbuild.dispatcher.EngineBuildService`); the wiring
(``p2pbuild._wiring``) hands one to :func:`~p2pbuild.koji.serve_koji_host`. The Koji side
sees build statuses and stored builds (:class:`~p2pbuild.dispatcher.BuildStatus`,
:class:`~p2pbuild.dispatcher.StoredBuild`), never the engine, its database or the
repository's files. Every method is called in the trio thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .._jobs import BuildrootSpec
from ..dispatcher import BuildStatus, StoredBuild

__all__ = ["BuildService"]


class BuildService(Protocol):
    @property
    def dispatcher_key(self) -> str:
        """The dispatcher's public key (text), which signed every job."""
        ...

    def source(self, sha256_hex: str) -> Path | None:
        """The stored source file with this SHA-256, if the service has it."""
        ...

    async def accept(self, source: Path, sha256_hex: str, user: str, *, arch: str | None,
                     os: str | None, replicas: int, time_limit_s: int,
                     buildroot: BuildrootSpec | None = None) -> str:
        """Accept an RPM build of ``source`` for ``user`` (in ``buildroot``, if given);
        its id, committed."""
        ...

    def status(self, build_id: str) -> BuildStatus | None:
        """The build's status; None if unknown."""
        ...

    def builds_since(self, user: str, since: float, limit: int = 1000) -> list[BuildStatus]:
        """``user``'s builds accepted at or after ``since``, newest first."""
        ...

    async def wait(self, build_id: str) -> BuildStatus:
        """Wait for the build's end; its final status."""
        ...

    def cancel(self, build_id: str, by: str) -> None:
        """Cancel the build unless it has ended (never raises)."""
        ...

    async def stored(self, build_id: str) -> StoredBuild:
        """The verified build as stored, with every verifying node's logs."""
        ...
