"""RPM repository metadata: ``repomd.xml``, ``primary.xml(.gz)`` and comps, parsed safely.

Pure functions over bytes a node downloaded from a repository it does not trust beyond the
signed digest of ``repomd.xml``. Every input is bounded *before* it is parsed
(:class:`MetadataLimits`), compressed input also while it is decompressed (a gzip bomb is
stopped at the bound), and the XML parser is ``defusedxml``'s (no entities, no DTDs, no
external references). Anything that is not what ``createrepo_c`` writes is
:class:`BadMetadataError`, never a crash.

Also :func:`rpmvercmp` and :class:`Dep`, rpm's version comparison and dependency model,
which the buildroot resolver (``_resolve.py``) uses.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from ._errors import BadMetadataError

__all__ = [
    "Dep",
    "MetadataLimits",
    "RepoFile",
    "RepoPackage",
    "compare_evr",
    "decompress_bounded",
    "parse_comps",
    "parse_dep",
    "parse_primary",
    "parse_repomd",
    "rpmvercmp",
    "satisfies",
]

_REPO = "{http://linux.duke.edu/metadata/repo}"
_COMMON = "{http://linux.duke.edu/metadata/common}"
_RPM = "{http://linux.duke.edu/metadata/rpm}"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+~^-]{0,199}")
_EVR_PART = re.compile(r"[A-Za-z0-9_.+~^]{1,128}")
_ARCH = re.compile(r"[A-Za-z0-9_]{1,32}")
_FLAGS = {"EQ": "=", "LT": "<", "LE": "<=", "GT": ">", "GE": ">="}
_OPS = frozenset(_FLAGS.values())


@attrs.frozen
class MetadataLimits:
    """Bounds on what a repository may send: ``repomd.xml``, a metadata file as
    downloaded, and the same file decompressed; and how many packages it may list."""

    max_repomd_bytes: int = 1 << 20
    max_metadata_bytes: int = 128 << 20
    max_decompressed_bytes: int = 1 << 30
    max_packages: int = 200_000


@attrs.frozen
class RepoFile:
    """A metadata file ``repomd.xml`` names: where it is and its SHA-256 (hex)."""

    href: str
    sha256: str
    size: int | None


@attrs.frozen(order=True)
class Dep:
    """An rpm dependency: a name and an optional version relation (``op`` one of
    ``= < <= > >=``; ``evr`` as ``[epoch:]version[-release]``)."""

    name: str
    op: str = ""
    evr: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.evr}" if self.op else self.name


@attrs.frozen
class RepoPackage:
    """One binary package of a repository's ``primary`` metadata."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str
    sha256: str
    location: str
    size: int
    provides: tuple[Dep, ...]
    requires: tuple[Dep, ...]
    files: tuple[str, ...]

    @property
    def evr(self) -> str:
        return f"{self.epoch}:{self.version}-{self.release}"

    @property
    def nevra(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch else ""
        return f"{self.name}-{epoch}{self.version}-{self.release}.{self.arch}"


def _fail(message: str) -> BadMetadataError:
    return BadMetadataError(f"malformed repository metadata: {message}")


def _parse_xml(data: bytes, what: str) -> Any:
    try:
        return SafeET.fromstring(data, forbid_dtd=True)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
        raise _fail(f"{what} is not acceptable XML ({exc.__class__.__name__})") from None


def decompress_bounded(data: bytes, href: str, max_bytes: int) -> bytes:
    """``data`` decompressed by the suffix of ``href`` (``.gz`` or none), at most
    ``max_bytes`` out. Raises :class:`BadMetadataError` (also for other compressions)."""
    if href.endswith(".xml"):
        if len(data) > max_bytes:
            raise _fail(f"{href} is larger than {max_bytes} bytes")
        return data
    if not href.endswith(".gz"):
        raise _fail(f"unsupported metadata compression: {href!r:.80}")
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            while chunk := stream.read(1 << 20):
                if out.tell() + len(chunk) > max_bytes:
                    raise _fail(f"{href} decompresses to more than {max_bytes} bytes")
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(f"{href} is not valid gzip ({exc.__class__.__name__})") from None
    return out.getvalue()


def parse_repomd(data: bytes, limits: MetadataLimits = MetadataLimits()) -> dict[str, RepoFile]:
    """The files ``repomd.xml`` names, by type (``primary``, ``group``, ...).

    Raises :class:`BadMetadataError` for oversize or malformed input, a ``href`` that is
    absolute or leaves the repository, or a checksum other than SHA-256.
    """
    if len(data) > limits.max_repomd_bytes:
        raise _fail(f"repomd.xml is larger than {limits.max_repomd_bytes} bytes")
    root = _parse_xml(data, "repomd.xml")
    if root.tag != f"{_REPO}repomd":
        raise _fail("repomd.xml has no <repomd> root")
    files: dict[str, RepoFile] = {}
    for item in root.findall(f"{_REPO}data"):
        kind = item.get("type", "")
        location = item.find(f"{_REPO}location")
        checksum = item.find(f"{_REPO}checksum")
        if location is None or checksum is None:
            raise _fail(f"repomd.xml entry {kind!r:.40} lacks location or checksum")
        href = location.get("href", "")
        _check_href(href)
        if checksum.get("type") != "sha256" or not _SHA256_HEX.fullmatch(checksum.text or ""):
            raise _fail(f"repomd.xml entry {kind!r:.40} has no SHA-256 checksum")
        size_el = item.find(f"{_REPO}size")
        size = int(size_el.text) if size_el is not None and (size_el.text or "").isdigit() else None
        files[kind] = RepoFile(href, checksum.text or "", size)
    if "primary" not in files:
        raise _fail("repomd.xml names no primary metadata")
    return files


def _check_href(href: str) -> None:
    parts = href.split("/")
    if (
        not href
        or len(href) > 512
        or href.startswith("/")
        or "\\" in href
        or any(p in ("", ".", "..") for p in parts)
        or not href.isprintable()
        or any(c in href for c in "?#% ")
    ):
        raise _fail(f"unsafe location {href!r:.80}")


def parse_dep(text: str) -> Dep:
    """A dependency as ``rpm -q --requires`` prints it: ``name`` or ``name OP evr``.

    Raises :class:`BadMetadataError` for anything else."""
    parts = text.split()
    if len(parts) == 1:
        return Dep(parts[0])
    if len(parts) == 3 and parts[1] in _OPS:
        return Dep(parts[0], parts[1], parts[2])
    raise _fail(f"bad dependency {text!r:.80}")


def _entries(element: Any) -> tuple[Dep, ...]:
    if element is None:
        return ()
    deps = []
    for entry in element.findall(f"{_RPM}entry"):
        name = entry.get("name", "")
        if not name or len(name) > 512 or not name.isprintable():
            raise _fail("dependency without a usable name")
        flags = entry.get("flags")
        if flags is None:
            deps.append(Dep(name))
            continue
        if flags not in _FLAGS:
            raise _fail(f"unknown dependency flag {flags!r:.10}")
        epoch, ver, rel = entry.get("epoch", "0"), entry.get("ver", ""), entry.get("rel")
        evr = f"{epoch}:{ver}" + (f"-{rel}" if rel else "")
        deps.append(Dep(name, _FLAGS[flags], evr))
    return tuple(deps)


def parse_primary(
    data: bytes, href: str, limits: MetadataLimits = MetadataLimits()
) -> tuple[RepoPackage, ...]:
    """Every package of a ``primary.xml`` (``.gz`` or plain, chosen by ``href``).

    Raises :class:`BadMetadataError` for oversize, malformed or unsafe input (a package
    location leaving the repository, a checksum that is not SHA-256, odd names)."""
    if len(data) > limits.max_metadata_bytes:
        raise _fail(f"{href} is larger than {limits.max_metadata_bytes} bytes")
    root = _parse_xml(decompress_bounded(data, href, limits.max_decompressed_bytes), href)
    if root.tag != f"{_COMMON}metadata":
        raise _fail("primary metadata has no <metadata> root")
    packages: list[RepoPackage] = []
    for item in root.findall(f"{_COMMON}package"):
        if len(packages) >= limits.max_packages:
            raise _fail(f"more than {limits.max_packages} packages")
        if item.get("type") != "rpm":
            continue
        packages.append(_package(item))
    return tuple(packages)


def _text(item: Any, tag: str, pattern: re.Pattern[str]) -> str:
    element = item.find(f"{_COMMON}{tag}")
    value = "" if element is None else (element.text or "")
    if not pattern.fullmatch(value):
        raise _fail(f"package {tag} {value!r:.60} is not acceptable")
    return value


def _package(item: Any) -> RepoPackage:
    name = _text(item, "name", _NAME)
    arch = _text(item, "arch", _ARCH)
    version_el = item.find(f"{_COMMON}version")
    checksum = item.find(f"{_COMMON}checksum")
    location = item.find(f"{_COMMON}location")
    size_el = item.find(f"{_COMMON}size")
    fmt = item.find(f"{_COMMON}format")
    if version_el is None or checksum is None or location is None or fmt is None:
        raise _fail(f"package {name} lacks version, checksum, location or format")
    epoch_text = version_el.get("epoch", "0")
    version, release = version_el.get("ver", ""), version_el.get("rel", "")
    if not epoch_text.isdigit() or len(epoch_text) > 9:
        raise _fail(f"package {name} has a bad epoch")
    if not _EVR_PART.fullmatch(version) or not _EVR_PART.fullmatch(release):
        raise _fail(f"package {name} has a bad version or release")
    if checksum.get("type") != "sha256" or not _SHA256_HEX.fullmatch(checksum.text or ""):
        raise _fail(f"package {name} has no SHA-256 checksum")
    href = location.get("href", "")
    _check_href(href)
    size_text = "" if size_el is None else size_el.get("package", "")
    if not size_text.isdigit():
        raise _fail(f"package {name} has no size")
    files = tuple(f.text or "" for f in fmt.findall(f"{_COMMON}file"))
    return RepoPackage(
        name=name,
        epoch=int(epoch_text),
        version=version,
        release=release,
        arch=arch,
        sha256=checksum.text or "",
        location=href,
        size=int(size_text),
        provides=_entries(fmt.find(f"{_RPM}provides")),
        requires=_entries(fmt.find(f"{_RPM}requires")),
        files=files,
    )


def parse_comps(
    data: bytes, href: str, limits: MetadataLimits = MetadataLimits()
) -> dict[str, tuple[str, ...]]:
    """Comps groups: id to the names of its mandatory and default packages.

    Raises :class:`BadMetadataError` for oversize or malformed input."""
    if len(data) > limits.max_metadata_bytes:
        raise _fail(f"{href} is larger than {limits.max_metadata_bytes} bytes")
    root = _parse_xml(decompress_bounded(data, href, limits.max_decompressed_bytes), href)
    if root.tag != "comps":
        raise _fail("comps metadata has no <comps> root")
    groups: dict[str, tuple[str, ...]] = {}
    for group in root.findall("group"):
        ident = group.find("id")
        if ident is None or not ident.text:
            raise _fail("comps group without id")
        names = []
        for req in group.iter("packagereq"):
            if req.get("type", "default") in ("mandatory", "default"):
                value = req.text or ""
                if not _NAME.fullmatch(value):
                    raise _fail(f"comps package name {value!r:.60}")
                names.append(value)
        groups[ident.text] = tuple(sorted(set(names)))
    return groups


# -- rpm version comparison -------------------------------------------------------------------

_SEGMENT = re.compile(r"~|\^|[0-9]+|[A-Za-z]+")


def _segments(text: str) -> Iterator[str]:
    yield from _SEGMENT.findall(text)


def rpmvercmp(a: str, b: str) -> int:
    """rpm's ``rpmvercmp``: -1, 0 or 1. Digit runs compare numerically and beat letter
    runs; ``~`` sorts before anything (even the end), ``^`` after the end but before
    anything else; other separators only split segments."""
    if a == b:
        return 0
    left, right = list(_segments(a)), list(_segments(b))
    i = 0
    while True:
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        i += 1
        if x == "~" or y == "~":
            if x != y:
                return -1 if x == "~" else 1
            continue
        if x == "^" or y == "^":
            if x is None:
                return -1
            if y is None:
                return 1
            if x != y:
                return -1 if x == "^" else 1
            continue
        if x is None or y is None:
            return 0 if x == y else (1 if y is None else -1)
        if x.isdigit() != y.isdigit():
            return 1 if x.isdigit() else -1
        if x.isdigit():
            xi, yi = int(x), int(y)
            if xi != yi:
                return 1 if xi > yi else -1
        elif x != y:
            return 1 if x > y else -1


def _split_evr(evr: str) -> tuple[int, str, str | None]:
    epoch_text, sep, rest = evr.partition(":")
    if not sep:
        epoch_text, rest = "0", evr
    version, dash, release = rest.partition("-")
    return (int(epoch_text) if epoch_text.isdigit() else 0), version, (release if dash else None)


def compare_evr(a: str, b: str) -> int:
    """Compare two ``[epoch:]version[-release]``; a missing release matches any (as rpm
    does when a dependency names no release)."""
    ea, va, ra = _split_evr(a)
    eb, vb, rb = _split_evr(b)
    if ea != eb:
        return 1 if ea > eb else -1
    result = rpmvercmp(va, vb)
    if result or ra is None or rb is None:
        return result
    return rpmvercmp(ra, rb)


def satisfies(provided: Dep, wanted: Dep) -> bool:
    """Does the capability ``provided`` (``name [= evr]``) satisfy ``wanted``?"""
    if provided.name != wanted.name:
        return False
    if not wanted.op or not provided.op:
        return True
    cmp = compare_evr(provided.evr, wanted.evr)
    if provided.op == "=":
        return {"=": cmp == 0, "<": cmp < 0, "<=": cmp <= 0, ">": cmp > 0, ">=": cmp >= 0}[
            wanted.op
        ]
    # Ranged provides are rare (and createrepo_c writes only EQ ones); accept overlap.
    return True
