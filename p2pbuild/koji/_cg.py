"""Content-generator metadata for a verified build: one buildroot per verifying node.

Koji's ``CGImport`` takes a JSON document (``metadata_version`` 0; see
``../shared/koji/cg-metadata-example.json``) with the build, its buildroots and its outputs.
Our mapping:

* ``build``: NVR from the SRPM header, ``source`` as the Koji task named it, start and end
  times, the reservation's ``build_id``, the ``task_id`` and the task's ``owner`` (the hub
  takes the build's task and owner from them), and ``extra.p2pbuild``: the dispatcher's
  build id and key, the verifying nodes and operators, and the outliers (nodes whose
  output differed and lost the tie-break);
* one buildroot per verifying node: ``host`` (``os`` from the node's ``/etc/os-release``,
  :func:`host_os`) and ``container`` from the build environment in its signed result
  (``container.type`` is ``none``: the node builds in a bubblewrap sandbox, not a
  container Koji knows), ``components``: every package of the buildroot its signed result
  lists, as an ``rpm`` component (name, version, release, epoch, arch, ``sigmd5``), and
  ``extra.p2pbuild`` with the node key, operator, job id, the SHA-256 of the signed job and
  result and of every artifact, and ``repo``: the build tag's repository the job pinned
  (tag, repo id, URL, ``repomd.xml`` SHA-256);
* outputs: the SRPM and RPMs (the verified files, identical on every node, so they name the
  first buildroot), and for each node its logs and its signed result under ``subdir`` =
  the node's fingerprint. Every buildroot is thereby referenced by an output, as Koji
  requires.

:func:`build_metadata` is pure: file facts (size, SHA-256, RPM arch) come in, a dict goes
out. :func:`node_proof` reads one verifying node's signed job and result from the stored
build (:class:`~p2pbuild.dispatcher.StoredBuild`) and :func:`node_files` names the files
uploaded for it: this module is the one place where a stored build becomes CG metadata.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .._jobs import BuildrootPackage, Job, Result
from ..dispatcher import StoredBuild, StoredProof

__all__ = [
    "CG_VERSION",
    "NodeProof",
    "OutputFile",
    "build_metadata",
    "host_os",
    "node_files",
    "node_proof",
    "node_subdir",
    "rpm_component",
    "tag_repo_of",
]

#: The names a verifying node's signed job and result are uploaded under.
JOB_FILE = "p2pbuild-job.msgpack"
RESULT_FILE = "p2pbuild-result.msgpack"

CG_VERSION = "0.1"


def node_subdir(fingerprint: str) -> str:
    """The log directory of one node: its fingerprint without colons (16 hex digits)."""
    return fingerprint.replace(":", "")


@attrs.frozen
class OutputFile:
    """One file to upload and list: ``relpath`` is its directory inside the upload dir
    (and, for logs, its ``subdir`` under the build's logs)."""

    filename: str
    size: int
    sha256: str
    type: str  # "rpm" or "log"
    arch: str = "noarch"
    relpath: str = ""

    def __attrs_post_init__(self) -> None:
        if self.type not in ("rpm", "log"):
            raise ValueError(f"output type must be rpm or log, not {self.type!r}")
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"bad output file name {self.filename!r}")


@attrs.frozen
class NodeProof:
    """One verifying node as the metadata shows it."""

    node: str
    fingerprint: str
    operator: str
    job_id: str
    job_sha256: str
    result_sha256: str
    environment: Mapping[str, str]
    started_ms: int
    ended_ms: int
    artifacts: Mapping[str, str]
    #: Its logs and signed result (type "log", relpath = node_subdir(fingerprint)).
    files: tuple[OutputFile, ...]
    #: The buildroot's packages as CG ``rpm`` components (empty without a buildroot).
    components: tuple[Mapping[str, Any], ...] = ()
    #: The Koji repository the signed job pinned (:func:`tag_repo_of`), or None.
    repo: Mapping[str, Any] | None = None


def tag_repo_of(job: Job) -> dict[str, Any] | None:
    """The Koji repository a signed job's buildroot names (``<topurl>/repos/<tag>/<id>/
    <arch>/``): tag, repo id, URL and pinned digest; None if it names none."""
    buildroot = job.spec.buildroot
    if buildroot is None:
        return None
    repo = buildroot.repos[0]
    match = re.search(r"/repos/([^/]+)/(\d+)/([^/]+)/?$", repo.url)
    return {
        "tag": match.group(1) if match else None,
        "repo_id": int(match.group(2)) if match else None,
        "url": repo.url,
        "repomd_sha256": repo.repomd_sha256.hex(),
    }


def rpm_component(package: BuildrootPackage) -> dict[str, Any]:
    """A buildroot package as a CG ``rpm`` component (Koji matches it by NVRA and
    ``sigmd5``)."""
    base, _, arch = package.nevra.rpartition(".")
    rest, _, release = base.rpartition("-")
    name, _, evr = rest.rpartition("-")
    epoch_text, colon, version = evr.partition(":")
    if not colon:
        epoch_text, version = "", evr
    return {
        "type": "rpm",
        "name": name,
        "version": version,
        "release": release,
        "epoch": int(epoch_text) if epoch_text else None,
        "arch": arch,
        "sigmd5": package.sigmd5.hex() if package.sigmd5 is not None else None,
        "signature": None,
    }


def host_os(environment: Mapping[str, str]) -> str:
    """A buildroot's ``host.os`` from a node's signed build environment: ``<ID>-<VERSION_ID>``
    of its ``/etc/os-release`` (``os_id``, ``os_version_id``; e.g. ``debian-12``, as Koji
    shows ``Fedora-40``), else ``os``, else ``unknown``."""
    os_id, version = environment.get("os_id", ""), environment.get("os_version_id", "")
    if os_id:
        return f"{os_id}-{version}" if version else os_id
    return environment.get("os") or "unknown"


def node_files(stored: StoredBuild, proof: StoredProof) -> list[Path]:
    """The local files uploaded for one verifying node, in :attr:`NodeProof.files` order:
    its signed job, its signed result and its logs."""
    return [stored.proof_path(proof.job), stored.proof_path(proof.result),
            *(stored.log_path(proof, log) for log in proof.logs)]


def node_proof(stored: StoredBuild, proof: StoredProof) -> NodeProof:
    """One verifying node of a stored build as the metadata shows it (reads its signed job
    and result; blocking). Raises :class:`~p2pbuild.RemoteError` for a result that no
    longer parses and :class:`OSError` for a missing file."""
    job_raw = stored.proof_path(proof.job).read_bytes()
    result_raw = stored.proof_path(proof.result).read_bytes()
    result = Result.from_bytes(result_raw)
    job = Job.from_bytes(job_raw)
    subdir = node_subdir(proof.fingerprint)
    files = [
        OutputFile(JOB_FILE, len(job_raw), hashlib.sha256(job_raw).hexdigest(), "log",
                   "noarch", subdir),
        OutputFile(RESULT_FILE, len(result_raw), hashlib.sha256(result_raw).hexdigest(),
                   "log", "noarch", subdir),
        *(OutputFile(log.name.replace("/", "_"), log.size, log.sha256, "log", "noarch", subdir)
          for log in proof.logs),
    ]
    return NodeProof(
        node=proof.node, fingerprint=proof.fingerprint, operator=proof.operator,
        job_id=proof.job_id, job_sha256=hashlib.sha256(job_raw).hexdigest(),
        result_sha256=hashlib.sha256(result_raw).hexdigest(),
        environment=result.environment_map, started_ms=result.started_ms,
        ended_ms=result.ended_ms,
        artifacts={a.name: a.sha256.hex() for a in result.artifacts}, files=tuple(files),
        components=tuple(rpm_component(p) for p in result.buildroot.packages)
        if result.buildroot is not None else (),
        repo=tag_repo_of(job),
    )


def build_metadata(
    *,
    name: str,
    version: str,
    release: str,
    epoch: int | None,
    source: str,
    start_time: int,
    end_time: int,
    content_generator: str,
    packages: Sequence[OutputFile],
    nodes: Sequence[NodeProof],
    extra: Mapping[str, Any],
    build_id: int | None = None,
    task_id: int | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """The ``CGImport`` metadata. ``packages`` are the SRPM and RPMs (type rpm), ``nodes``
    the verifying nodes in proof order (at least one). Raises ValueError for an empty
    ``nodes``, a package that is not type rpm or a node file that is not a log.

    ``build_id`` is the reservation's build (the hub refuses a token without it),
    ``task_id`` the Koji task the build belongs to (the hub sets the build's task from it)
    and ``owner`` the Koji user the build is for (else the importing host owns it)."""
    if not nodes:
        raise ValueError("a verified build has at least one verifying node")
    buildroots = []
    output: list[dict[str, Any]] = []
    for index, proof in enumerate(nodes, start=1):
        env = dict(proof.environment)
        arch = env.get("arch", "noarch")
        tools = [
            {"name": tool, "version": env[tool]}
            for tool in ("rpm", "rpmbuild", "bwrap", "make") if env.get(tool)
        ]
        buildroots.append({
            "id": index,
            "host": {"os": host_os(env), "arch": arch},
            "content_generator": {"name": content_generator, "version": CG_VERSION},
            "container": {"type": "none", "arch": arch},
            "tools": tools,
            "components": [dict(c) for c in proof.components],
            "extra": {"p2pbuild": {
                "node": proof.node,
                "fingerprint": proof.fingerprint,
                "operator": proof.operator,
                "job_id": proof.job_id,
                "job_sha256": proof.job_sha256,
                "result_sha256": proof.result_sha256,
                "started_ms": proof.started_ms,
                "ended_ms": proof.ended_ms,
                "artifacts": dict(sorted(proof.artifacts.items())),
                "environment": env,
                "repo": dict(proof.repo) if proof.repo is not None else None,
            }},
        })
        for item in proof.files:
            if item.type != "log":
                raise ValueError(f"{item.filename}: a node's own files are logs")
            output.append(_output(item, index, subdir=True))
    for item in packages:
        if item.type != "rpm":
            raise ValueError(f"{item.filename}: packages are rpms")
        output.append(_output(item, 1, subdir=False))
    build: dict[str, Any] = {
        "name": name,
        "version": version,
        "release": release,
        "epoch": epoch,
        "source": source,
        "start_time": int(start_time),
        "end_time": int(end_time),
        "extra": {"typeinfo": {"rpm": None}, **extra},
    }
    for key, value in (("build_id", build_id), ("task_id", task_id), ("owner", owner)):
        if value is not None:
            build[key] = value
    return {
        "metadata_version": 0,
        "build": build,
        "buildroots": buildroots,
        "output": output,
    }


def _output(item: OutputFile, buildroot: int, *, subdir: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "buildroot_id": buildroot,
        "filename": item.filename,
        "filesize": item.size,
        "arch": item.arch,
        "checksum_type": "sha256",
        "checksum": item.sha256,
        "type": item.type,
    }
    if item.relpath:
        entry["relpath"] = item.relpath
        if subdir:
            entry["subdir"] = item.relpath
    return entry
