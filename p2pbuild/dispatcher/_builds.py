"""The dispatcher as a build service for the roles above it (the Koji build host): accept a
source, follow a build to its end, cancel it, read the stored build with its logs.

:class:`EngineBuildService` is the narrow face of the :class:`~._engine.Engine` that
``p2pbuild.koji`` depends on (its ``BuildService`` protocol); the Koji side never sees the
engine, its database or the repository's files. Values are :class:`BuildStatus` and
:class:`~._stored.StoredBuild`. Everything runs in the trio thread that runs the engine.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import attrs
import trio

from .._jobs import BuildrootSpec
from ._db import BuildRow, BuildState
from ._engine import BuildRequest, Engine
from ._errors import DispatcherError, SinkError, UnknownBuildError
from ._stored import StoredBuild

__all__ = ["BuildStatus", "EngineBuildService", "SourceChangedError"]

_log = logging.getLogger("p2pbuild.dispatcher")


class SourceChangedError(SinkError):
    """The source file no longer has the SHA-256 it was accepted under."""

    code = "source-changed"


@attrs.frozen
class BuildStatus:
    """Where one build is, as a service user sees it."""

    id: str
    state: BuildState
    user: str
    source_sha256: str
    created_at: float
    cancel_requested: bool
    #: Why it ended (or waits), one line; the mismatch report when replicas disagreed.
    reason: str
    report: str
    #: Failed without a single attempt: no capable node could be found.
    no_node: bool

    @property
    def live(self) -> bool:
        """Still usable by a later attempt of the same request: not failed or cancelled."""
        return self.state in (BuildState.QUEUED, BuildState.RUNNING, BuildState.VERIFIED)


@attrs.define(eq=False)
class EngineBuildService:
    """:class:`Engine` builds behind the interface the Koji host uses (module doc)."""

    engine: Engine

    @property
    def dispatcher_key(self) -> str:
        """The dispatcher's public key (text), which signed every job of its builds."""
        return str(self.engine.identity.public_key)

    def source(self, sha256_hex: str) -> Path | None:
        """The stored source file with this SHA-256, if the service has it."""
        store = self.engine.sources
        return store.path(sha256_hex) if store.has(sha256_hex) else None

    async def accept(self, source: Path, sha256_hex: str, user: str, *, arch: str | None,
                     os: str | None, replicas: int, time_limit_s: int,
                     buildroot: BuildrootSpec | None = None) -> str:
        """Store ``source`` (checked against ``sha256_hex``) and accept an RPM build of it
        for ``user``; returns the build id, committed. Raises :class:`SourceChangedError`
        and :class:`~._errors.BadRequestError`."""
        data = await trio.Path(source).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256_hex:
            raise SourceChangedError(f"{source.name} changed since it was hashed")
        store = self.engine.sources
        await trio.Path(store.root).mkdir(parents=True, exist_ok=True)
        if not store.has(sha256_hex):
            partial = store.path(sha256_hex).with_suffix(".part")
            await trio.Path(partial).write_bytes(data)
            await trio.Path(partial).rename(store.path(sha256_hex))
        request = BuildRequest(
            source_name=source.name, source_sha256=sha256_hex, source_size=len(data),
            arch=arch, os=os, replicas=replicas, time_limit_s=time_limit_s,
            buildroot=buildroot,
        )
        return self.engine.accept(request, user, None).id

    def status(self, build_id: str) -> BuildStatus | None:
        """The build's status; None if the service does not know it."""
        try:
            return self._status(self.engine.db.build(build_id))
        except UnknownBuildError:
            return None

    def builds_since(self, user: str, since: float, limit: int = 1000) -> list[BuildStatus]:
        """``user``'s builds accepted at or after ``since``, newest first."""
        out = []
        for row in self.engine.db.builds(user=user, limit=limit):
            if row.created_at < since:
                break
            out.append(self._status(row))
        return out

    async def wait(self, build_id: str) -> BuildStatus:
        """Wait until the build has ended (verified, failed or cancelled); its status.
        Raises :class:`UnknownBuildError`."""
        while True:
            row = self.engine.db.build(build_id)
            if row.state.terminal:
                return self._status(row)
            await self.engine.wait_changed()

    def cancel(self, build_id: str, by: str) -> None:
        """Cancel the build unless it has ended or is unknown (the engine tells the
        nodes). Never raises: a refusal is logged."""
        status = self.status(build_id)
        if status is None or status.state.terminal:
            return
        try:
            self.engine.cancel(build_id, by)
        except DispatcherError as exc:
            _log.warning("cancel of build %s: %s", build_id, exc)

    async def stored(self, build_id: str) -> StoredBuild:
        """The verified build as stored, with each verifying node's signed job, result
        and logs. Raises :class:`UnknownBuildError` and :class:`SinkError` (not verified,
        or its directory is unreadable)."""
        row = self.engine.db.build(build_id)
        if row.state is not BuildState.VERIFIED or not row.sink_path:
            raise SinkError(f"build {build_id} is {row.state.value}, not stored")
        return await trio.to_thread.run_sync(StoredBuild.read, Path(row.sink_path))

    def _status(self, row: BuildRow) -> BuildStatus:
        no_node = row.state is BuildState.FAILED and not self.engine.db.attempts(row.id)
        return BuildStatus(
            id=row.id, state=row.state, user=row.user, source_sha256=row.source_sha256,
            created_at=row.created_at, cancel_requested=row.cancel_requested,
            reason=row.reason, report=row.report, no_node=no_node,
        )
