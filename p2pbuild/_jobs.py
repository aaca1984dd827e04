"""Signed jobs and signed results: what a dispatcher and a node exchange.

Two signed objects, each a canonical msgpack array whose last element is an ed25519
signature over ``domain || encode(the other elements as an array)`` (see ``docs/jobs.md``):

* :class:`Job`, signed by a dispatcher (``Domain.JOB``, at most :data:`MAX_JOB_SIZE`)::

      [1, job_id(bin16), nonce(bin16), dispatcher(bin32), node(bin32|nil),
       issued_at, expires_at, spec(map), signature(bin64)]

* :class:`Result`, signed by the node that ran the job (``Domain.RESULT``, at most
  :data:`MAX_RESULT_SIZE`)::

      [1, job_id(bin16), job_sha256(bin32), node(bin32), state, exit_code(int|nil),
       started_ms, ended_ms, environment(map), artifacts, logs, signature(bin64)]

(The short signed orders about jobs, :class:`~p2pbuild._orders.PullAuth` and
:class:`~p2pbuild._orders.JobControl`, are in ``_orders.py``.)

As with records, ``from_bytes`` checks size (before decoding), canonical encoding, shape and
signature: a value of these classes is always well-formed and authentic. Whether it is
*acceptable now* (fresh, from a trusted key, for this node, not replayed) is ``check``'s job,
because that depends on ``now``, the trust list and the caller's replay cache.

This module is core: no I/O, no clock reads, no trio.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from ._codec import encode
from ._errors import (
    ExpiredError,
    LifetimeError,
    LocalError,
    MalformedError,
    NotYetValidError,
    WrongNodeError,
)
from ._fields import (
    NONCE_SIZE,
    _check_token,
    _member,
    _printable,
    _require_bytes,
    _require_map,
    _require_time,
    _signed_part,
    _split_signed,
    check_relative_name,
    fresh_nonce,
    sign_array,
)
from ._identity import Domain, Identity, PublicKey, Role
from ._replay import ReplayCache
from ._trust import TrustList

__all__ = [
    "BUILDROOT_METHODS",
    "DEFAULT_ARCH",
    "DEFAULT_JOB_POLICY",
    "DEFAULT_OS",
    "JOB_OPTION_KEYS",
    "MAX_JOB_SIZE",
    "MAX_RESULT_SIZE",
    "BuildType",
    "BuildrootPackage",
    "BuildrootRecord",
    "BuildrootSpec",
    "FileDigest",
    "Job",
    "JobPolicy",
    "JobSpec",
    "Repository",
    "Result",
    "ResultState",
    "SourceArtifact",
    "Target",
    "check_relative_name",
]

MAX_JOB_SIZE = 16 * 1024
MAX_RESULT_SIZE = 64 * 1024

ID_SIZE = 16
_U63 = 2**63
#: Largest source or artifact size we can describe (1 TiB); real bounds are the node's.
_MAX_FILE_SIZE = 2**40
_MAX_ARTIFACTS = 512
_MAX_LOGS = 32
_MAX_URL = 512
_MAX_ENV = 32
_MAX_OPTION_LIST = 16
#: Build options a job may carry. Anything else is refused at parse time, so a node never
#: sees an option it does not understand; the executor validates the values further.
JOB_OPTION_KEYS = frozenset({"check", "jobs", "with", "without"})
_OPTION_TYPES: dict[str, type] = {"check": bool, "jobs": int, "with": list, "without": list}
_ENV_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
#: Capability build types that say a node can build in a buildroot a job names, by the
#: method it uses: ``dnf --installroot`` plus the sandbox, or mock. A dispatcher sends a
#: job with a buildroot only to a node offering one of them.
BUILDROOT_METHODS = frozenset({"rpm.dnf", "rpm.mock"})
#: Buildroot bounds: repositories per job, base-set entries, packages a result may list.
_MAX_REPOS = 8
_MAX_BASE_PACKAGES = 64
_MAX_BUILDROOT_PACKAGES = 512
#: An rpm dependency name as a base set may name it: ``gcc``, ``pkgconfig(zlib)``,
#: ``/usr/bin/make``, ``perl(Carp)``. No spaces, so no version ranges.
_DEP_NAME = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_.+:/()-]{0,127}")
#: ``name-[epoch:]version-release.arch`` as rpm prints it.
_NEVRA = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+~^-]{0,199}-(\d+:)?[A-Za-z0-9_.+~^]+"
                    r"-[A-Za-z0-9_.+~^]+\.[A-Za-z0-9_]+")

#: An option value: a flag, a small integer, or a list of tokens.
OptionValue: TypeAlias = bool | int | tuple[str, ...]


# -- job --------------------------------------------------------------------------------------


class BuildType(enum.StrEnum):
    RPM = "rpm"
    MAKE = "make"


def _to_build_type(value: object) -> BuildType:
    return _member(BuildType, value, "build type")


@attrs.frozen
class SourceArtifact:
    """The job's input file: a bare file name, its size and SHA-256, and where to get it.

    ``url`` is an ``https://`` URL the node fetches from, or ``""`` when the dispatcher
    uploads the file to the node itself (inline upload). Either way the node re-hashes what
    arrives; the URL's TLS is not what makes the source authentic, the signed digest is.
    """

    name: str
    size: int
    sha256: bytes
    url: str = ""

    def __attrs_post_init__(self) -> None:
        if "/" in check_relative_name(self.name, "source name"):
            raise MalformedError("source name is a bare file name")
        if type(self.size) is not int or not 0 <= self.size <= _MAX_FILE_SIZE:
            raise MalformedError(f"source size must be an integer in [0, {_MAX_FILE_SIZE}]")
        _require_bytes(self.sha256, 32, "source sha256")
        url = _printable(self.url, _MAX_URL, "source url")
        if url and (not url.startswith("https://") or " " in url):
            raise MalformedError("source url must be empty (inline upload) or an https:// URL")

    @property
    def inline(self) -> bool:
        """The dispatcher uploads the source; the node does not fetch it."""
        return not self.url

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "url": self.url}

    @classmethod
    def from_wire(cls, body: object) -> SourceArtifact:
        body = _require_map(body, ("name", "sha256", "size", "url"), "source")
        return cls(body["name"], body["size"], body["sha256"], body["url"])


#: The platform a build targets when neither its request nor the user's last build names
#: one, and the examples' platform (the one place these defaults are written).
DEFAULT_ARCH = "x86_64"
DEFAULT_OS = "fedora-41"


@attrs.frozen
class Target:
    """The platform a job must build on: ``arch`` and ``os`` as in a capability record."""

    arch: str
    os: str

    def __attrs_post_init__(self) -> None:
        _check_token(self.arch, "target arch")
        _check_token(self.os, "target os")

    def to_wire(self) -> dict[str, Any]:
        return {"arch": self.arch, "os": self.os}

    @classmethod
    def from_wire(cls, body: object) -> Target:
        body = _require_map(body, ("arch", "os"), "target")
        return cls(body["arch"], body["os"])


def _to_option_value(key: str, value: object) -> OptionValue:
    expected = _OPTION_TYPES[key]
    if expected is bool:
        if type(value) is not bool:
            raise MalformedError(f"option {key!r} must be a boolean")
        return value
    if expected is int:
        if type(value) is not int or not 1 <= value <= 1024:
            raise MalformedError(f"option {key!r} must be an integer in [1, 1024]")
        return value
    if not isinstance(value, (list, tuple)) or len(value) > _MAX_OPTION_LIST:
        raise MalformedError(f"option {key!r} must be a list of at most {_MAX_OPTION_LIST}")
    items = tuple(_check_token(item, f"option {key!r} item") for item in value)
    if list(items) != sorted(set(items)):
        raise MalformedError(f"option {key!r} must be sorted and without duplicates")
    return items


def _convert_options(options: object) -> tuple[tuple[str, OptionValue], ...]:
    if isinstance(options, tuple):
        pairs: Iterable[tuple[object, object]] = options
    elif isinstance(options, Mapping):
        pairs = options.items()
    else:
        raise MalformedError("build options must be a map")
    result = []
    for key, value in pairs:
        if key not in JOB_OPTION_KEYS:
            raise MalformedError(f"build option {key!r:.40} is not allowed")
        assert isinstance(key, str)
        result.append((key, _to_option_value(key, value)))
    result.sort()
    if len({key for key, _ in result}) != len(result):
        raise MalformedError("duplicate build option")
    return tuple(result)


@attrs.frozen
class Repository:
    """An RPM repository pinned to one snapshot: a name (token), its base URL (``https://``
    or ``http://``; ``repodata/repomd.xml`` is below it) and the SHA-256 of that
    ``repomd.xml``. The digest, not the transport, makes what a node fetches authentic
    (Koji hubs often serve repositories over plain HTTP).

    The digest pins everything else: ``repomd.xml`` carries the checksum of the package
    metadata, which carries the checksum of every package. A node refuses a repository
    whose ``repomd.xml`` no longer has this digest (``repo-changed``).
    """

    name: str
    url: str
    repomd_sha256: bytes

    def __attrs_post_init__(self) -> None:
        _check_token(self.name, "repository name")
        url = _printable(self.url, _MAX_URL, "repository url")
        if not url.startswith(("https://", "http://")) or any(c in url for c in " ?#"):
            raise MalformedError("repository url must be an https:// or http:// URL "
                                 "without query")
        _require_bytes(self.repomd_sha256, 32, "repository repomd sha256")

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "repomd_sha256": self.repomd_sha256, "url": self.url}

    @classmethod
    def from_wire(cls, body: object) -> Repository:
        body = _require_map(body, ("name", "repomd_sha256", "url"), "repository")
        return cls(body["name"], body["url"], body["repomd_sha256"])


def _to_repos(items: object) -> tuple[Repository, ...]:
    if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= _MAX_REPOS:
        raise MalformedError(f"a buildroot names 1 to {_MAX_REPOS} repositories")
    repos = tuple(r if isinstance(r, Repository) else Repository.from_wire(r) for r in items)
    if len({r.name for r in repos}) != len(repos):
        raise MalformedError("repository names must be unique")
    return repos


def _to_dep_names(items: object) -> tuple[str, ...]:
    if not isinstance(items, (list, tuple)) or len(items) > _MAX_BASE_PACKAGES:
        raise MalformedError(f"a base package set has at most {_MAX_BASE_PACKAGES} entries")
    for item in items:
        if type(item) is not str or not _DEP_NAME.fullmatch(item):
            raise MalformedError(f"bad base package name {item!r:.60}")
    names = tuple(items)
    if list(names) != sorted(set(names)):
        raise MalformedError("base packages must be sorted and without duplicates")
    return names


@attrs.frozen
class BuildrootSpec:
    """The clean buildroot an ``rpm`` job builds in: pinned repositories (in priority
    order) and the base package set, a comps ``group`` (``""`` for none, e.g.
    ``buildsys-build``) and/or explicit ``packages``. The node adds the SRPM's
    BuildRequires, resolved against the same repositories."""

    repos: tuple[Repository, ...] = attrs.field(converter=_to_repos)
    group: str = ""
    packages: tuple[str, ...] = attrs.field(default=(), converter=_to_dep_names)

    def __attrs_post_init__(self) -> None:
        if self.group:
            _check_token(self.group, "comps group")
        elif type(self.group) is not str:
            raise MalformedError("comps group must be text")

    def to_wire(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "packages": list(self.packages),
            "repos": [r.to_wire() for r in self.repos],
        }

    @classmethod
    def from_wire(cls, body: object) -> BuildrootSpec:
        body = _require_map(body, ("group", "packages", "repos"), "buildroot")
        return cls(body["repos"], body["group"], body["packages"])


@attrs.frozen
class JobSpec:
    """What to build: the source, the build type, the target platform, the allow-listed
    build options (:data:`JOB_OPTION_KEYS`), the requested time limit in seconds and, for
    ``rpm`` jobs, the buildroot (None: build with what the node's host has)."""

    source: SourceArtifact
    build_type: BuildType = attrs.field(converter=_to_build_type)
    target: Target
    options: tuple[tuple[str, OptionValue], ...] = attrs.field(
        default=(), converter=_convert_options
    )
    time_limit_s: int = 3600
    buildroot: BuildrootSpec | None = None

    def __attrs_post_init__(self) -> None:
        if type(self.time_limit_s) is not int or not 1 <= self.time_limit_s <= 24 * 3600:
            raise MalformedError("time limit must be 1 to 86400 seconds")
        if self.buildroot is not None and self.build_type is not BuildType.RPM:
            raise MalformedError("only rpm jobs name a buildroot")

    @property
    def options_map(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "build_type": self.build_type.value,
            "limits": {"time_s": self.time_limit_s},
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options},
            "source": self.source.to_wire(),
            "target": self.target.to_wire(),
        }
        if self.buildroot is not None:
            wire["buildroot"] = self.buildroot.to_wire()
        return wire

    @classmethod
    def from_wire(cls, body: object) -> JobSpec:
        fields: tuple[str, ...] = ("build_type", "limits", "options", "source", "target")
        if type(body) is dict and "buildroot" in body:
            fields = (*fields, "buildroot")
        body = _require_map(body, fields, "spec")
        limits = _require_map(body["limits"], ("time_s",), "limits")
        if type(body["options"]) is not dict:
            raise MalformedError("build options must be a map")
        return cls(
            source=SourceArtifact.from_wire(body["source"]),
            build_type=body["build_type"],
            target=Target.from_wire(body["target"]),
            options=body["options"],
            time_limit_s=limits["time_s"],
            buildroot=(
                BuildrootSpec.from_wire(body["buildroot"]) if "buildroot" in body else None
            ),
        )


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    """An attrs validator: :class:`LocalError` (a misconfigured policy) below ``minimum``."""

    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if value < minimum:
            raise LocalError(f"{attribute.name} must be at least {minimum}, not {value}")

    return check


@attrs.frozen
class JobPolicy:
    """Acceptance bounds for jobs, pull tokens and job control orders (seconds); every bound
    is a parameter, checked when the policy is built (a lifetime or window must be
    positive, a skew may be 0)."""

    #: Longest allowed job lifetime (``expires_at - issued_at``).
    max_job_lifetime: int = attrs.field(default=24 * 3600, validator=_at_least(1))
    #: How far in the future ``issued_at`` may be, for clocks that disagree.
    max_clock_skew: int = attrs.field(default=300, validator=_at_least(0))
    #: A pull token or job control order is fresh for this long after (and before) its
    #: ``issued_at``.
    pull_auth_window: int = attrs.field(default=60, validator=_at_least(1))


DEFAULT_JOB_POLICY = JobPolicy()


@attrs.frozen
class Job:
    """A build job signed by a dispatcher; authentic and well-formed.

    Build with :meth:`create` (dispatcher side) or :meth:`from_bytes` (node side), then call
    :meth:`check` before running it.
    """

    job_id: bytes
    nonce: bytes
    dispatcher: PublicKey
    #: The one node this job is for, or None if any node may run it.
    node: PublicKey | None
    issued_at: int
    expires_at: int
    spec: JobSpec
    signature: bytes = attrs.field(repr=False)
    #: The exact wire bytes.
    raw: bytes = attrs.field(repr=False, eq=False)

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the wire bytes; a :class:`Result` names its job by this."""
        return hashlib.sha256(self.raw).digest()

    @property
    def id_hex(self) -> str:
        return self.job_id.hex()

    @classmethod
    def create(
        cls,
        identity: Identity,
        spec: JobSpec,
        *,
        issued_at: int,
        lifetime: int,
        node: PublicKey | None = None,
        job_id: bytes | None = None,
        nonce: bytes | None = None,
    ) -> Job:
        """Sign ``spec`` as dispatcher ``identity``. ``job_id`` and ``nonce`` default to
        fresh random bytes (``os.urandom``).

        Raises :class:`MalformedError` for a bad time, lifetime, id or nonce and
        :class:`OversizeError` if the job would exceed :data:`MAX_JOB_SIZE`.
        """
        job_id = os.urandom(ID_SIZE) if job_id is None else job_id
        _require_bytes(job_id, ID_SIZE, "job id")
        nonce = fresh_nonce(nonce, issued_at)
        if lifetime <= 0:
            raise MalformedError("lifetime must be positive")
        expires_at = _require_time(issued_at + lifetime, "expires_at")
        signature, raw = sign_array(
            identity,
            Domain.JOB,
            [
                job_id,
                nonce,
                identity.public_key.raw,
                None if node is None else node.raw,
                issued_at,
                expires_at,
                spec.to_wire(),
            ],
            MAX_JOB_SIZE,
        )
        return cls(
            job_id, nonce, identity.public_key, node, issued_at, expires_at, spec, signature, raw
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_JOB_SIZE) -> Job:
        """Parse and authenticate one job.

        Raises :class:`OversizeError` (before decoding), :class:`MalformedError` or
        :class:`BadSignatureError`. Does not consult the trust list: see :meth:`check`.
        """
        value = _split_signed(data, max_size, 9, "job")
        _, job_id, nonce, dispatcher, node, issued_at, expires_at, spec, signature = value
        _require_bytes(job_id, ID_SIZE, "job id")
        _require_bytes(nonce, NONCE_SIZE, "nonce")
        dispatcher_key = PublicKey(_require_bytes(dispatcher, 32, "dispatcher"))
        node_key = None if node is None else PublicKey(_require_bytes(node, 32, "node"))
        _require_time(issued_at, "issued_at")
        _require_time(expires_at, "expires_at")
        if type(spec) is not dict:
            raise MalformedError("job spec must be a map")
        dispatcher_key.verify(Domain.JOB, _signed_part(data, 9), signature)
        parsed = JobSpec.from_wire(spec)
        return cls(
            job_id, nonce, dispatcher_key, node_key, issued_at, expires_at, parsed, signature, data
        )

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self,
        now: float,
        trust_list: TrustList,
        node_key: PublicKey,
        seen: ReplayCache,
        *,
        policy: JobPolicy = DEFAULT_JOB_POLICY,
    ) -> None:
        """Check that the node ``node_key`` may run this job at time ``now``.

        Does not record the job in ``seen``: call ``seen.add(job.job_id, job.expires_at,
        now)`` when the job is admitted, so a job refused for a transient reason (no free
        slot) can be sent again. Raises, in this order of checks:
        :class:`LifetimeError`, :class:`ExpiredError`, :class:`NotYetValidError`,
        :class:`UntrustedKeyError` (the signer is not a dispatcher on ``trust_list``),
        :class:`WrongNodeError` (addressed to another node) or :class:`ReplayError`.
        """
        if self.expires_at <= self.issued_at:
            raise LifetimeError("job expires_at is not after issued_at")
        lifetime = self.expires_at - self.issued_at
        if lifetime > policy.max_job_lifetime:
            raise LifetimeError(f"job lifetime {lifetime}s exceeds {policy.max_job_lifetime}s")
        if now >= self.expires_at:
            raise ExpiredError(f"job {self.id_hex} expired {now - self.expires_at:.0f}s ago")
        if self.issued_at > now + policy.max_clock_skew:
            raise NotYetValidError(f"job issued {self.issued_at - now:.0f}s in the future")
        trust_list.require(self.dispatcher, Role.DISPATCHER)
        if self.node is not None and self.node != node_key:
            raise WrongNodeError(
                f"job {self.id_hex} is for node {self.node.fingerprint}, "
                f"not {node_key.fingerprint}"
            )
        seen.check(self.job_id, self.expires_at, now)


# -- result -----------------------------------------------------------------------------------


class ResultState(enum.StrEnum):
    """How a build ended."""

    SUCCEEDED = "succeeded"
    #: The build ran and exited non-zero.
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    #: Killed for exceeding an output, log or disk bound.
    LIMIT_EXCEEDED = "limit-exceeded"
    CANCELLED = "cancelled"
    #: The node could not run it (source did not match its digest, unsafe archive, ...).
    REJECTED = "rejected"
    #: The node shut down before the build ended and gave the job back unfinished; the
    #: dispatcher should send it elsewhere.
    HANDED_BACK = "handed-back"


def _to_result_state(value: object) -> ResultState:
    return _member(ResultState, value, "result state")


@attrs.frozen(order=True)
class FileDigest:
    """An output file: a safe relative name, its size and its SHA-256."""

    name: str
    size: int
    sha256: bytes

    def __attrs_post_init__(self) -> None:
        check_relative_name(self.name)
        if type(self.size) is not int or not 0 <= self.size <= _MAX_FILE_SIZE:
            raise MalformedError(f"file size must be an integer in [0, {_MAX_FILE_SIZE}]")
        _require_bytes(self.sha256, 32, "file sha256")

    def to_wire(self) -> list[Any]:
        return [self.name, self.size, self.sha256]

    @classmethod
    def from_wire(cls, item: object) -> FileDigest:
        if type(item) is not list or len(item) != 3:
            raise MalformedError("a file entry is [name, size, sha256]")
        return cls(item[0], item[1], item[2])


def _file_list(items: object, limit: int, what: str) -> tuple[FileDigest, ...]:
    if not isinstance(items, (list, tuple)) or len(items) > limit:
        raise MalformedError(f"{what} must be a list of at most {limit} entries")
    files = tuple(
        item if isinstance(item, FileDigest) else FileDigest.from_wire(item) for item in items
    )
    names = [f.name for f in files]
    if names != sorted(set(names)):
        raise MalformedError(f"{what} must be sorted by name, each name once")
    return files


def _convert_artifacts(items: object) -> tuple[FileDigest, ...]:
    return _file_list(items, _MAX_ARTIFACTS, "artifacts")


def _convert_logs(items: object) -> tuple[FileDigest, ...]:
    return _file_list(items, _MAX_LOGS, "logs")


def _convert_environment(env: object) -> tuple[tuple[str, str], ...]:
    if isinstance(env, Mapping):
        pairs: list[Any] = list(env.items())
    elif isinstance(env, tuple) and all(type(p) is tuple and len(p) == 2 for p in env):
        pairs = list(env)
    else:
        raise MalformedError("environment must be a map")
    result = []
    for key, value in pairs:
        if type(key) is not str or not _ENV_KEY.fullmatch(key):
            raise MalformedError(f"environment key {key!r:.40} must match [a-z][a-z0-9_.-]*")
        result.append((key, _printable(value, 200, f"environment {key}")))
    if len(result) > _MAX_ENV:
        raise MalformedError(f"environment has at most {_MAX_ENV} entries")
    result.sort()
    if len({k for k, _ in result}) != len(result):
        raise MalformedError("duplicate environment key")
    return tuple(result)


@attrs.frozen(order=True)
class BuildrootPackage:
    """One package installed in a buildroot: ``name-[epoch:]version-release.arch``, the
    SHA-256 of the package file (as the repository metadata names it) and, when the node
    read it, the package's header ``SIGMD5`` (what Koji matches RPM components by)."""

    nevra: str
    sha256: bytes
    sigmd5: bytes | None = None

    def __attrs_post_init__(self) -> None:
        if type(self.nevra) is not str or not _NEVRA.fullmatch(self.nevra):
            raise MalformedError(f"bad package NEVRA {self.nevra!r:.80}")
        _require_bytes(self.sha256, 32, "package sha256")
        if self.sigmd5 is not None:
            _require_bytes(self.sigmd5, 16, "package sigmd5")

    def to_wire(self) -> list[Any]:
        if self.sigmd5 is None:
            return [self.nevra, self.sha256]
        return [self.nevra, self.sha256, self.sigmd5]


def _to_pinned_repos(items: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= _MAX_REPOS:
        raise MalformedError(f"a buildroot lists 1 to {_MAX_REPOS} repositories")
    repos = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise MalformedError("a buildroot repository is [name, repomd_sha256]")
        repos.append((_check_token(item[0], "repository name"),
                      _require_bytes(item[1], 32, "repomd sha256")))
    if len({name for name, _ in repos}) != len(repos):
        raise MalformedError("repository names must be unique")
    return tuple(repos)


def _to_buildroot_packages(items: object) -> tuple[BuildrootPackage, ...]:
    if not isinstance(items, (list, tuple)) or len(items) > _MAX_BUILDROOT_PACKAGES:
        raise MalformedError(f"a buildroot lists at most {_MAX_BUILDROOT_PACKAGES} packages")
    packages = []
    for item in items:
        if isinstance(item, BuildrootPackage):
            packages.append(item)
        elif isinstance(item, (list, tuple)) and len(item) in (2, 3):
            packages.append(BuildrootPackage(*item))
        else:
            raise MalformedError("a buildroot package is [nevra, sha256, sigmd5?]")
    if [p.nevra for p in packages] != sorted({p.nevra for p in packages}):
        raise MalformedError("buildroot packages must be sorted by NEVRA, each once")
    return tuple(packages)


@attrs.frozen
class BuildrootRecord:
    """What a build ran against: the pinned repositories (name, ``repomd.xml`` SHA-256,
    in the job's order) and every installed package, sorted by NEVRA. Two results verify
    each other only when their buildroot records are equal (:attr:`key`)."""

    repos: tuple[tuple[str, bytes], ...] = attrs.field(converter=_to_pinned_repos)
    packages: tuple[BuildrootPackage, ...] = attrs.field(converter=_to_buildroot_packages)

    @property
    def key(self) -> str:
        """A hex digest of the repositories and the packages' NEVRAs and SHA-256s: equal iff
        the buildroots are the same (``sigmd5`` follows from a package's bytes)."""
        packages = [[p.nevra, p.sha256] for p in self.packages]
        repos = [[name, digest] for name, digest in self.repos]
        return hashlib.sha256(encode({"packages": packages, "repos": repos})).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {
            "packages": [p.to_wire() for p in self.packages],
            "repos": [[name, digest] for name, digest in self.repos],
        }

    @classmethod
    def from_wire(cls, body: object) -> BuildrootRecord:
        body = _require_map(body, ("packages", "repos"), "buildroot")
        return cls(body["repos"], body["packages"])


@attrs.frozen
class Result:
    """A build result signed by the node that ran the job; authentic and well-formed.

    ``environment`` holds facts about the build root (``arch``, ``os``, ``rpm``,
    ``kernel``, ...). ``artifacts`` and ``logs`` are sorted by name. Two results agree when
    their ``artifacts`` are equal (design item 10).
    """

    job_id: bytes
    #: SHA-256 of the signed job's wire bytes: ties the result to exactly that job.
    job_sha256: bytes
    node: PublicKey
    state: ResultState = attrs.field(converter=_to_result_state)
    exit_code: int | None
    started_ms: int
    ended_ms: int
    environment: tuple[tuple[str, str], ...] = attrs.field(converter=_convert_environment)
    artifacts: tuple[FileDigest, ...] = attrs.field(converter=_convert_artifacts)
    logs: tuple[FileDigest, ...] = attrs.field(converter=_convert_logs)
    signature: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False, eq=False)
    #: The buildroot the build ran in; None for a job that named none.
    buildroot: BuildrootRecord | None = None

    def __attrs_post_init__(self) -> None:
        _require_bytes(self.job_id, ID_SIZE, "job id")
        _require_bytes(self.job_sha256, 32, "job sha256")
        if self.exit_code is not None and (
            type(self.exit_code) is not int or not -(2**31) <= self.exit_code < 2**31
        ):
            raise MalformedError("exit code must be a 32-bit integer or nil")
        _require_time(self.started_ms, "started_ms")
        _require_time(self.ended_ms, "ended_ms")
        if self.ended_ms < self.started_ms:
            raise MalformedError("ended_ms is before started_ms")

    @property
    def environment_map(self) -> dict[str, str]:
        return dict(self.environment)

    @property
    def duration_ms(self) -> int:
        return self.ended_ms - self.started_ms

    def artifact(self, name: str) -> FileDigest | None:
        for item in self.artifacts:
            if item.name == name:
                return item
        return None

    def log(self, name: str) -> FileDigest | None:
        for item in self.logs:
            if item.name == name:
                return item
        return None

    def _elements(self) -> list[Any]:
        """The signed array's elements after its format version."""
        return [
            self.job_id,
            self.job_sha256,
            self.node.raw,
            self.state.value,
            self.exit_code,
            self.started_ms,
            self.ended_ms,
            dict(self.environment),
            [item.to_wire() for item in self.artifacts],
            [item.to_wire() for item in self.logs],
            *([] if self.buildroot is None else [self.buildroot.to_wire()]),
        ]

    @classmethod
    def create(
        cls,
        identity: Identity,
        job: Job,
        *,
        state: ResultState | str,
        exit_code: int | None,
        started_ms: int,
        ended_ms: int,
        environment: Mapping[str, str],
        artifacts: Iterable[FileDigest],
        logs: Iterable[FileDigest],
        buildroot: BuildrootRecord | None = None,
    ) -> Result:
        """Sign the outcome of ``job`` as node ``identity``. Artifacts and logs are sorted;
        ``buildroot`` is what the build ran in (for a job that named a buildroot).

        Raises :class:`MalformedError` for a field out of bounds (unsafe name, duplicate
        name, too many files) and :class:`OversizeError` past :data:`MAX_RESULT_SIZE`.
        """
        unsigned = cls(
            job.job_id,
            job.sha256,
            identity.public_key,
            state,
            exit_code,
            started_ms,
            ended_ms,
            environment,
            tuple(sorted(artifacts, key=lambda f: f.name)),
            tuple(sorted(logs, key=lambda f: f.name)),
            b"",  # signed below; this value never leaves the method unsigned
            b"",
            buildroot,
        )
        signature, raw = sign_array(
            identity, Domain.RESULT, unsigned._elements(), MAX_RESULT_SIZE
        )
        return attrs.evolve(unsigned, signature=signature, raw=raw)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_RESULT_SIZE) -> Result:
        """Parse and authenticate one result.

        Raises :class:`OversizeError` (before decoding), :class:`MalformedError` or
        :class:`BadSignatureError`. Whether the node is trusted, and whether the result
        answers the job you sent (:meth:`check_answers`), is for the caller to ask.
        """
        # 12 elements, or 13 when the job named a buildroot (the 12th is its record).
        elements = 13 if data[:1] == bytes([0x90 | 13]) else 12
        value = _split_signed(data, max_size, elements, "result")
        (_, job_id, job_sha256, node, state, exit_code, started_ms, ended_ms,
         environment, artifacts, logs) = value[:11]
        signature = value[-1]
        node_key = PublicKey(_require_bytes(node, 32, "node"))
        if type(environment) is not dict:
            raise MalformedError("environment must be a map")
        if type(state) is not str:
            raise MalformedError("state must be text")
        node_key.verify(Domain.RESULT, _signed_part(data, elements), signature)
        buildroot = BuildrootRecord.from_wire(value[11]) if elements == 13 else None
        return cls(
            job_id, job_sha256, node_key, state, exit_code, started_ms, ended_ms,
            environment, artifacts, logs, signature, data, buildroot,
        )

    def to_bytes(self) -> bytes:
        return self.raw

    def check_answers(self, job: Job, node_key: PublicKey) -> None:
        """Check that this result is ``node_key``'s answer to exactly ``job``.

        Raises :class:`WrongNodeError` if another node signed it, :class:`MalformedError`
        if it names another job.
        """
        if self.node != node_key:
            raise WrongNodeError(f"result signed by {self.node.fingerprint}, not the node asked")
        if self.job_id != job.job_id or self.job_sha256 != job.sha256:
            raise MalformedError("result is for another job")
