"""A verified build as the repository sink stored it: a typed value, read and written as
``manifest.json`` (``_sink`` module doc for the directory layout).

Every reader (the Koji host, the demo, the tests) takes a :class:`StoredBuild` from
:meth:`StoredBuild.read` instead of parsing the manifest by hand; :meth:`to_json` is what
the sink writes. The JSON is format 1: ``build_id``, ``nvr``, ``source`` {name, sha256},
``stored_at``, ``trust_list_version``, ``artifacts`` [{name, size, sha256}],
``verified_by`` [{node, fingerprint, operator, job, result, job_id, environment,
duration_ms, logs}] and the build's ``user``, ``arch``, ``os`` and ``build_type``. A node's
``logs`` (its signed logs that reached the dispatcher, under ``logs/<n>-<fingerprint>/``)
may be missing in manifests written before logs were kept: read as none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .._errors import MalformedError
from .._jobs import check_relative_name
from ._errors import SinkError

__all__ = ["StoredBuild", "StoredFile", "StoredProof"]

FORMAT = 1


def _hex64(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError(f"{attribute.name} must be 64 lowercase hex digits")


def _relative(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        check_relative_name(value)
    except MalformedError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None


@attrs.frozen
class StoredFile:
    """A stored file: its name (a safe relative path), size and SHA-256 (hex)."""

    name: str = attrs.field(validator=_relative)
    size: int
    sha256: str = attrs.field(validator=_hex64)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredFile:
        return cls(str(data["name"]), int(data["size"]), str(data["sha256"]))


@attrs.frozen
class StoredProof:
    """One verifying node: its signed job and result (paths relative to the build's
    directory), and its logs (names relative to :attr:`log_dir`)."""

    node: str
    fingerprint: str
    operator: str
    job: str = attrs.field(validator=_relative)
    result: str = attrs.field(validator=_relative)
    job_id: str
    environment: Mapping[str, str]
    duration_ms: int
    logs: tuple[StoredFile, ...] = ()

    @property
    def stem(self) -> str:
        """``<n>-<fingerprint>``: the name its job, result and log directory share."""
        return self.job.rsplit("/", 1)[-1].removesuffix(".job")

    @property
    def log_dir(self) -> str:
        return f"logs/{self.stem}"

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "fingerprint": self.fingerprint, "operator": self.operator,
            "job": self.job, "result": self.result, "job_id": self.job_id,
            "environment": dict(self.environment), "duration_ms": self.duration_ms,
            "logs": [f.to_json() for f in self.logs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredProof:
        return cls(
            node=str(data["node"]), fingerprint=str(data["fingerprint"]),
            operator=str(data["operator"]), job=str(data["job"]), result=str(data["result"]),
            job_id=str(data["job_id"]),
            environment={str(k): str(v) for k, v in dict(data["environment"]).items()},
            duration_ms=int(data["duration_ms"]),
            logs=tuple(StoredFile.from_json(f) for f in data.get("logs", ())),
        )


@attrs.frozen
class StoredBuild:
    """A verified build in the repository (module doc). ``path`` is its directory (not
    part of the JSON)."""

    build_id: str
    nvr: str
    source_name: str
    source_sha256: str
    stored_at: float
    trust_list_version: int
    artifacts: tuple[StoredFile, ...]
    verified_by: tuple[StoredProof, ...]
    user: str = ""
    arch: str = ""
    os: str = ""
    build_type: str = ""
    path: Path = attrs.field(default=Path(), eq=False)

    def artifact_path(self, name: str) -> Path:
        return self.path / "artifacts" / name

    def proof_path(self, relpath: str) -> Path:
        """A proof's signed job or result (``StoredProof.job`` / ``.result``)."""
        return self.path / relpath

    def log_path(self, proof: StoredProof, log: StoredFile) -> Path:
        return self.path / proof.log_dir / log.name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "build_id": self.build_id,
            "nvr": self.nvr,
            "source": {"name": self.source_name, "sha256": self.source_sha256},
            "stored_at": self.stored_at,
            "trust_list_version": self.trust_list_version,
            "artifacts": [a.to_json() for a in self.artifacts],
            "verified_by": [p.to_json() for p in self.verified_by],
            "user": self.user,
            "arch": self.arch,
            "os": self.os,
            "build_type": self.build_type,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path = Path()) -> StoredBuild:
        """Raises :class:`SinkError` for a manifest that is not format 1 or lacks a key."""
        try:
            if data.get("format") != FORMAT:
                raise SinkError(f"manifest format {data.get('format')!r} is not {FORMAT}")
            return cls(
                build_id=str(data["build_id"]), nvr=str(data["nvr"]),
                source_name=str(data["source"]["name"]),
                source_sha256=str(data["source"]["sha256"]),
                stored_at=float(data["stored_at"]),
                trust_list_version=int(data["trust_list_version"]),
                artifacts=tuple(StoredFile.from_json(a) for a in data["artifacts"]),
                verified_by=tuple(StoredProof.from_json(p) for p in data["verified_by"]),
                user=str(data.get("user", "")), arch=str(data.get("arch", "")),
                os=str(data.get("os", "")), build_type=str(data.get("build_type", "")),
                path=path,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SinkError(f"manifest of {path}: {type(exc).__name__}: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> StoredBuild:
        """The build stored in directory ``path`` (blocking). Raises :class:`SinkError`."""
        try:
            data = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot read the manifest of {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SinkError(f"manifest of {path} is not an object")
        return cls.from_json(data, path)

    def to_bytes(self) -> bytes:
        """The manifest file's contents."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()
