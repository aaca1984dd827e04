"""Safe extraction of peer tarballs: every escape and every bomb is refused, not repaired."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from p2pbuild import MalformedError, OversizeError, RemoteError
from p2pbuild.node import ArchiveLimitError, UnsafeArchiveError, extract_tar_gz
from p2pbuild.testing import FIXED_EPOCH, hello_tarball


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mtime = FIXED_EPOCH
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, b""


def _extract(archive: Path, tmp_path: Path, **bounds: int) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_tar_gz(
        archive,
        dest,
        max_members=bounds.get("max_members", 1000),
        max_bytes=bounds.get("max_bytes", 1 << 20),
    )


def test_good_tarball_extracts_with_modes_and_mtimes(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    tree = extract_tar_gz(source.path, dest, max_members=100, max_bytes=1 << 20)
    assert tree.root == "hello-1.0"
    assert tree.newest_mtime == FIXED_EPOCH
    assert sorted(p.name for p in (dest / "hello-1.0").iterdir()) == [
        "Makefile",
        "configure",
        "hello.sh.in",
    ]
    configure = dest / "hello-1.0" / "configure"
    assert configure.stat().st_mode & 0o777 == 0o755
    assert configure.stat().st_mtime == FIXED_EPOCH


def test_several_top_level_entries_build_in_the_root(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", _file("Makefile"), _file("src/main.c"))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract_tar_gz(archive, dest, max_members=10, max_bytes=100).root == "."


def test_inside_links_are_fine(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "a.tar.gz",
        _file("p/data.txt", b"hello"),
        _link("p/alias", "data.txt"),
        _link("p/sub/up", "../data.txt"),
        _link("p/hard", "p/data.txt", tarfile.LNKTYPE),
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_tar_gz(archive, dest, max_members=10, max_bytes=100)
    assert (dest / "p/sub/up").read_bytes() == b"hello"
    assert (dest / "p/hard").read_bytes() == b"hello"


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([_file("../evil")], id="dotdot"),
        pytest.param([_file("p/../../evil")], id="inner-dotdot"),
        pytest.param([_file("/tmp/evil")], id="absolute"),
        pytest.param([_link("p/l", "/etc/passwd")], id="symlink-absolute"),
        pytest.param([_link("p/l", "../../etc")], id="symlink-escape"),
        pytest.param([_link("p/l", "."), _file("p/l/x")], id="write-through-symlink"),
        pytest.param([_link("p/h", "/etc/passwd", tarfile.LNKTYPE)], id="hardlink-absolute"),
        pytest.param([_link("p/h", "../x", tarfile.LNKTYPE)], id="hardlink-escape"),
        pytest.param([_link("p/h", "p/missing", tarfile.LNKTYPE)], id="hardlink-dangling"),
        pytest.param([_special("p/dev", tarfile.CHRTYPE)], id="char-device"),
        pytest.param([_special("p/blk", tarfile.BLKTYPE)], id="block-device"),
        pytest.param([_special("p/fifo", tarfile.FIFOTYPE)], id="fifo"),
        pytest.param([_file("p/a"), _file("p/a")], id="duplicate"),
    ],
)
def test_escapes_are_rejected(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", *members)
    with pytest.raises(UnsafeArchiveError) as info:
        _extract(archive, tmp_path)
    assert isinstance(info.value, MalformedError)
    assert isinstance(info.value, RemoteError)
    assert not (tmp_path / "evil").exists()


def test_too_many_members_is_a_bomb(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "many.tar.gz", *(_file(f"p/f{i}", b"") for i in range(101)))
    with pytest.raises(ArchiveLimitError) as info:
        _extract(archive, tmp_path, max_members=100)
    assert isinstance(info.value, OversizeError)


def test_huge_declared_size_is_rejected_before_reading(tmp_path: Path) -> None:
    info = tarfile.TarInfo("p/huge")
    info.size = 10 << 30
    # Only the header: the data is never there, and never read.
    (tmp_path / "huge.tar.gz").write_bytes(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
    with pytest.raises(ArchiveLimitError):
        _extract(tmp_path / "huge.tar.gz", tmp_path, max_bytes=1 << 20)


def test_gzip_bomb_is_stopped_while_decompressing(tmp_path: Path) -> None:
    # 64 MiB of zeros compress to ~64 KiB; the tar framing is a single huge long-name
    # header, so the declared-size check never sees it: the decompression cap must.
    info = tarfile.TarInfo("p/x")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 64 << 20
    payload = info.tobuf(tarfile.GNU_FORMAT) + bytes(64 << 20)
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(payload, compresslevel=1))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 1 << 20
    with pytest.raises(ArchiveLimitError):
        _extract(tmp_path / "bomb.tar.gz", tmp_path, max_members=10, max_bytes=1 << 20)


@pytest.mark.parametrize(
    "data",
    [b"", b"not gzip at all", gzip.compress(b"gzip but not tar" * 100)],
    ids=["empty", "not-gzip", "not-tar"],
)
def test_garbage_is_rejected(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(data)
    with pytest.raises(UnsafeArchiveError):
        _extract(tmp_path / "junk.tar.gz", tmp_path)
