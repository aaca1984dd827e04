"""What a client asks the engine for: a :class:`BuildRequest`, and the content-addressed
:class:`SourceStore` its source file is kept in until every job has fetched it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from .._errors import RemoteError
from .._jobs import (
    DEFAULT_ARCH,
    DEFAULT_OS,
    BuildrootSpec,
    BuildType,
    Job,
    JobSpec,
    Repository,
    Result,
    SourceArtifact,
    Target,
)
from .._records import MachineType
from ..dht import Query
from ..node import BadMetadataError, RepoUnreachableError, fetch_https
from ._db import AttemptRow, BuildRow, BuildState
from ._errors import BadRequestError, SourceUnavailableError
from ._sources import fetch_source

__all__ = [
    "OPTIONS_BUILDROOT_KEY",
    "BuildRequest",
    "ParsedBuild",
    "SourceStore",
    "buildroot_from_json",
    "buildroot_to_json",
    "fetch_repomd",
    "stored_buildroot",
    "stored_job_spec",
]

#: A build's buildroot is kept in its stored options under this key (JSON of
#: :func:`buildroot_to_json`); it is not a build option and never reaches a job's options.
OPTIONS_BUILDROOT_KEY = "buildroot"
#: Largest repomd.xml the dispatcher fetches to pin a repository.
MAX_REPOMD_BYTES = 1 << 20


@attrs.frozen
class BuildRequest:
    """A build as a client asks for it. ``arch``/``os`` None: the user's last platform,
    else the configured default. ``source_url`` empty: the source is already stored."""

    source_name: str
    source_sha256: str
    source_size: int
    build_type: BuildType = attrs.field(default=BuildType.RPM, converter=BuildType)
    arch: str | None = None
    os: str | None = None
    machine: MachineType | None = None
    pool: str | None = None
    replicas: int = 2
    min_memory_mb: int = 0
    min_disk_mb: int = 0
    options: Mapping[str, Any] = attrs.field(factory=dict)
    time_limit_s: int = 3600
    source_url: str = ""
    #: Run only on this lease's nodes (``_leases.py``); the lease gives arch/os by default.
    lease: str | None = None
    #: The buildroot (pinned repositories and base set) an rpm build runs in.
    buildroot: BuildrootSpec | None = None

    def validate(self) -> None:
        """Raises :class:`BadRequestError` for a value no build can have."""
        self.job_spec(self.arch or DEFAULT_ARCH, self.os or DEFAULT_OS)

    def to_row(
        self, build_id: str, now: float, user: str, team: str | None, spec: JobSpec,
        *, ready: bool,
    ) -> BuildRow:
        """The accepted build as the database keeps it: this request on ``spec``'s
        platform (made by :meth:`job_spec`), the source ``ready`` or still to fetch."""
        return BuildRow(
            id=build_id,
            created_at=now,
            updated_at=now,
            user=user,
            team=team,
            state=BuildState.QUEUED,
            source_name=self.source_name,
            source_sha256=self.source_sha256,
            source_size=self.source_size,
            source_url=self.source_url,
            source_ready=ready,
            build_type=self.build_type.value,
            arch=spec.target.arch,
            os=spec.target.os,
            machine=self.machine.value if self.machine else None,
            pool=self.pool,
            replicas=self.replicas,
            min_memory_mb=self.min_memory_mb,
            min_disk_mb=self.min_disk_mb,
            options=json.dumps(
                spec.options_map if spec.buildroot is None
                else {**spec.options_map,
                      OPTIONS_BUILDROOT_KEY: buildroot_to_json(spec.buildroot)},
                sort_keys=True,
            ),
            time_limit_s=spec.time_limit_s,
            lease_id=self.lease,
        )

    def job_spec(self, arch: str, os: str) -> JobSpec:
        """The build's job spec on the platform ``arch``/``os`` (no source URL yet: each
        job names where its node fetches the source). Raises :class:`BadRequestError` for
        a value no build can have."""
        try:
            spec = JobSpec(
                SourceArtifact(self.source_name, self.source_size,
                               bytes.fromhex(self.source_sha256)),
                self.build_type, Target(arch, os), dict(self.options), self.time_limit_s,
                self.buildroot,
            )
            if self.pool is not None:
                Query(pool=self.pool)
        except (RemoteError, ValueError) as exc:
            raise BadRequestError(str(exc)) from None
        if not 2 <= self.replicas <= 8:
            # Fewer than two would be shown while two operators build and verify anyway.
            raise BadRequestError(
                "replicas must be 2 to 8: a build is verified by nodes of at least two "
                "different operators"
            )
        if self.source_url and not self.source_url.startswith(("https://", "http://")):
            raise BadRequestError("source url must be http:// or https://")
        return spec


@attrs.frozen
class SourceStore:
    """Content-addressed source files: ``<root>/<sha256 hex>``."""

    root: Path
    #: Hosts a source URL may name although they are not public (``_sources.py``).
    allow_hosts: tuple[str, ...] = ()

    def path(self, sha256_hex: str) -> Path:
        if len(sha256_hex) != 64 or any(c not in "0123456789abcdef" for c in sha256_hex):
            raise BadRequestError("a SHA-256 is 64 lowercase hex digits")
        return self.root / sha256_hex

    def has(self, sha256_hex: str) -> bool:
        return self.path(sha256_hex).is_file()

    async def fetch(self, url: str, sha256_hex: str, max_bytes: int) -> int:
        """Download ``url`` into the store, checking size and SHA-256; returns the size.
        The URL's host must be public or on :attr:`allow_hosts` (``_sources.py``).
        Raises :class:`SourceUnavailableError`."""
        target = self.path(sha256_hex)
        await trio.Path(self.root).mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        try:
            size, sha = await fetch_source(url, partial, max_bytes, self.allow_hosts)
        except BaseException:
            await trio.Path(partial).unlink(missing_ok=True)
            raise
        if sha != sha256_hex:
            await trio.Path(partial).unlink(missing_ok=True)
            raise SourceUnavailableError("the fetched source does not match its SHA-256")
        await trio.Path(partial).rename(target)
        return size


def buildroot_to_json(spec: BuildrootSpec) -> dict[str, Any]:
    """``spec`` as plain JSON (digests in hex), as the API takes it and a build stores it."""
    return {
        "group": spec.group,
        "packages": list(spec.packages),
        "repos": [
            {"name": r.name, "url": r.url, "repomd_sha256": r.repomd_sha256.hex()}
            for r in spec.repos
        ],
    }


async def fetch_repomd(url: str) -> bytes:
    """``<url>/repodata/repomd.xml``, at most :data:`MAX_REPOMD_BYTES`, fetched as a
    node fetches repository metadata (:func:`~p2pbuild.node.fetch_https`: pinning is
    what makes the repository trustworthy later, TLS is not checked). Raises
    :class:`BadRequestError` when it cannot be fetched."""
    target = f"{url.rstrip('/')}/repodata/repomd.xml"
    try:
        return await fetch_https(target, MAX_REPOMD_BYTES, timeout=30)
    except (RepoUnreachableError, BadMetadataError) as exc:
        raise BadRequestError(str(exc)) from None


async def buildroot_from_json(
    body: object, fetch: Callable[[str], Awaitable[bytes]] = fetch_repomd
) -> BuildrootSpec:
    """A client's buildroot, pinned: ``{"repos": [{"name", "url", "repomd_sha256"?}],
    "group"?: str, "packages"?: [str]}``. A repository given without its digest is pinned
    here, at submission, to the SHA-256 of its current ``repomd.xml`` (``fetch``). Raises
    :class:`BadRequestError`."""
    if not isinstance(body, dict) or not isinstance(body.get("repos"), list):
        raise BadRequestError("buildroot must be an object with a list of repos")
    if set(body) - {"repos", "group", "packages"}:
        raise BadRequestError("buildroot may have only repos, group and packages")
    repos = []
    for item in body["repos"][:16]:
        if not isinstance(item, dict) or set(item) - {"name", "url", "repomd_sha256"}:
            raise BadRequestError("a buildroot repo is {name, url, repomd_sha256?}")
        name, url, digest = item.get("name"), item.get("url"), item.get("repomd_sha256")
        if not isinstance(name, str) or not isinstance(url, str):
            raise BadRequestError("a buildroot repo needs a name and a url")
        try:
            if digest is None:
                Repository(name, url, bytes(32))  # check the URL before fetching it
                pinned = hashlib.sha256(await fetch(url)).digest()
            elif isinstance(digest, str):
                pinned = bytes.fromhex(digest)
            else:
                raise BadRequestError("repomd_sha256 must be hex text")
            repos.append(Repository(name, url, pinned))
        except (RemoteError, ValueError) as exc:
            raise BadRequestError(f"buildroot repo {name!r:.40}: {exc}") from None
    packages = body.get("packages", [])
    try:
        return BuildrootSpec(
            tuple(repos),
            body.get("group", ""),
            tuple(sorted(set(packages))) if isinstance(packages, list) else packages,
        )
    except (RemoteError, TypeError) as exc:
        raise BadRequestError(f"buildroot: {exc}") from None


def stored_buildroot(options: Mapping[str, Any]) -> BuildrootSpec | None:
    """The buildroot kept in a build's stored options, or None."""
    body = options.get(OPTIONS_BUILDROOT_KEY)
    if body is None:
        return None
    return BuildrootSpec(
        tuple(Repository(r["name"], r["url"], bytes.fromhex(r["repomd_sha256"]))
              for r in body["repos"]),
        body["group"],
        tuple(body["packages"]),
    )


def stored_job_spec(build: BuildRow, source_url: str) -> JobSpec:
    """The job spec of an accepted build (as :meth:`BuildRequest.job_spec` made it, kept in
    the database), with ``source_url`` where its node fetches the source."""
    options = build.options_map
    buildroot = stored_buildroot(options)
    options.pop(OPTIONS_BUILDROOT_KEY, None)
    return JobSpec(
        SourceArtifact(build.source_name, build.source_size,
                       bytes.fromhex(build.source_sha256), source_url),
        BuildType(build.build_type),
        Target(build.arch, build.os),
        options,
        build.time_limit_s,
        buildroot,
    )


@attrs.define
class ParsedBuild:
    """A build's typed values, each parsed once per build task rather than on every engine
    step: its job spec (from the stored options), its attempts' signed jobs and results by
    attempt id (those the engine signed or fetched itself, or read once after a restart),
    and the machine type of each node chosen in this task."""

    spec: JobSpec | None = None
    jobs: dict[int, Job] = attrs.field(factory=dict)
    results: dict[int, Result] = attrs.field(factory=dict)
    machines: dict[int, str] = attrs.field(factory=dict)

    def job(self, attempt: AttemptRow) -> Job:
        """The attempt's signed job: the one the engine signed, or parsed from its row."""
        job = self.jobs.get(attempt.id)
        if job is None or job.id_hex != attempt.job_id:
            job = self.jobs[attempt.id] = Job.from_bytes(attempt.job)
        return job

    def job_spec(self, build: BuildRow, public_url: str) -> JobSpec:
        """:func:`stored_job_spec` with the source at ``public_url``, once the build's
        source is ready (its size is final)."""
        if self.spec is None:
            base = public_url.rstrip("/")
            url = f"{base}/v1/sources/{build.source_sha256}" if public_url else ""
            self.spec = stored_job_spec(build, url)
        return self.spec
