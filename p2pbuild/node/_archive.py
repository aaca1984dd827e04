"""Safe extraction of a peer's source tarball (``.tar.gz``) into a work directory.

The archive comes from a peer, so it is read as a stream and every member is checked
*before* anything is written; the first bad member rejects the whole archive (the
partially written tree is the caller's work directory, removed with it). Rejected:

* a name that is absolute, empty, contains ``..`` or passes through a symlink the archive
  itself created (that is how "symlink to a directory, then write through it" escapes);
* a symlink whose target is absolute or resolves (lexically, from its own directory)
  outside the extraction root; a hard link to anything but an earlier regular file;
* device nodes, FIFOs, sockets, GNU sparse files, and a second member of the same name;
* more than ``max_members`` members, more than ``max_bytes`` of declared file data, or a
  decompressed stream longer than those bounds allow (a gzip bomb, or a huge GNU long name
  header, is stopped while decompressing, not after).

We do not use :meth:`tarfile.TarFile.extractall`: its ``data`` filter *skips or rewrites*
some of these cases, and a job from a peer should be refused, not silently repaired.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

import attrs

from ._errors import ArchiveLimitError, UnsafeArchiveError

__all__ = ["ExtractedTree", "extract_tar_gz"]

# Bytes of tar framing we allow per member on top of the file data: a header block, a
# possible pax or GNU long-name block pair, and padding.
_FRAMING_PER_MEMBER = 4 * 512
_FRAMING_FIXED = 64 * 1024
_CHUNK = 64 * 1024


@attrs.frozen
class ExtractedTree:
    """What :func:`extract_tar_gz` wrote.

    ``root`` is the directory to build in, relative to the destination: the archive's single
    top-level directory when it has exactly one (the ``name-version/`` convention), else
    ``"."``. ``newest_mtime`` is the latest member mtime (a deterministic fallback for
    ``SOURCE_DATE_EPOCH``), 0 for an empty archive.
    """

    root: str
    members: int
    file_bytes: int
    newest_mtime: int


class _CappedReader:
    """A read-only stream that raises :class:`ArchiveLimitError` past ``cap`` bytes."""

    def __init__(self, raw: BinaryIO, cap: int) -> None:
        self._raw = raw
        self._cap = cap
        self._seen = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._cap + 1 - self._seen
        data = self._raw.read(min(size, self._cap + 1 - self._seen))
        self._seen += len(data)
        if self._seen > self._cap:
            raise ArchiveLimitError(f"archive decompresses to more than {self._cap} bytes")
        return data


def _normalize(name: str) -> str:
    """Return the member name without ``./`` parts; raise for anything that could escape."""
    if not name or name.startswith("/") or "\x00" in name:
        raise UnsafeArchiveError(f"archive member with absolute or empty name: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member name contains '..': {name!r}")
    return "/".join(parts)


def extract_tar_gz(archive: Path, dest: Path, *, max_members: int, max_bytes: int) -> ExtractedTree:
    """Extract ``archive`` (gzip-compressed tar) into the existing, empty directory ``dest``.

    Blocking; run it in a worker thread. Raises :class:`UnsafeArchiveError` for a malformed
    archive or a member that could escape ``dest`` and :class:`ArchiveLimitError` for an
    archive over ``max_members`` or ``max_bytes``. After an error ``dest`` holds a partial
    tree that the caller must remove. ``OSError`` from writing to ``dest`` (disk full)
    propagates unchanged.
    """
    cap = max_bytes + max_members * _FRAMING_PER_MEMBER + _FRAMING_FIXED
    try:
        with archive.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            reader = _CappedReader(gz, cap)  # type: ignore[arg-type]
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                return _extract_members(tar, dest, max_members=max_members, max_bytes=max_bytes)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise UnsafeArchiveError(f"not a valid tar.gz archive: {exc}") from exc


def _extract_members(
    tar: tarfile.TarFile, dest: Path, *, max_members: int, max_bytes: int
) -> ExtractedTree:
    seen: set[str] = set()
    dirs: set[str] = set()
    files: set[str] = set()
    links: set[str] = set()
    tops: set[str] = set()
    members = 0
    total = 0
    newest = 0
    for member in tar:
        members += 1
        if members > max_members:
            raise ArchiveLimitError(f"archive has more than {max_members} members")
        name = _normalize(member.name)
        if not name:
            continue  # the archive's "./" entry
        prefixes = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
        if any(p in links for p in prefixes):
            raise UnsafeArchiveError(f"archive member {name!r} goes through a symlink")
        if any(p in files for p in prefixes):
            raise UnsafeArchiveError(f"archive member {name!r} is below a regular file")
        if name in seen and not (member.isdir() and name in dirs):
            raise UnsafeArchiveError(f"archive member {name!r} appears twice")
        seen.add(name)
        tops.add(name.split("/", 1)[0])
        newest = max(newest, int(member.mtime))
        target = dest / name
        if member.isdir():
            dirs.add(name)
            target.mkdir(parents=True, exist_ok=True)
        elif member.issym():
            link = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
            if not link or link.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchiveError(f"symlink {name!r} points outside the archive: {link!r}")
            links.add(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, target)
        elif member.islnk():
            source = _normalize(member.linkname)
            if source not in files:
                raise UnsafeArchiveError(f"hard link {name!r} to a non-file: {member.linkname!r}")
            files.add(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(dest / source, target, follow_symlinks=False)
        elif member.isreg() and not member.issparse():
            total += member.size
            if total > max_bytes:
                raise ArchiveLimitError(f"archive holds more than {max_bytes} bytes of files")
            files.add(name)
            _write_file(tar, member, target)
        else:
            raise UnsafeArchiveError(f"archive member {name!r} is not a file, directory or link")
    root = "."
    if len(tops) == 1 and next(iter(tops)) in dirs:
        root = next(iter(tops))
    return ExtractedTree(root=root, members=members, file_bytes=total, newest_mtime=newest)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o755 if member.mode & 0o100 else 0o644
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - isreg() members always have data
        raise UnsafeArchiveError(f"archive member {member.name!r} has no data")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, src:
        remaining = member.size
        while remaining > 0:
            chunk = src.read(min(_CHUNK, remaining))
            if not chunk:
                raise UnsafeArchiveError(f"archive member {member.name!r} is truncated")
            out.write(chunk)
            remaining -= len(chunk)
    # make decides what to rebuild from mtimes, so keep the archive's.
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
