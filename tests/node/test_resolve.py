"""The buildroot's pure parts: repository metadata parsing, rpm version order, the
resolver, the host base and the /usr union's bind list."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from p2pbuild.node import BadMetadataError, MissingBuildDependencyError
from p2pbuild.node._hostbase import HostFacts, _rpm_evr
from p2pbuild.node._repodata import (
    Dep,
    MetadataLimits,
    RepoPackage,
    compare_evr,
    parse_comps,
    parse_primary,
    parse_repomd,
    rpmvercmp,
)
from p2pbuild.node._resolve import HostBase, resolve
from p2pbuild.node._sandbox import usr_union

SHA = "a" * 64
REPOMD = f"""<?xml version="1.0" encoding="UTF-8"?>
<repomd xmlns="http://linux.duke.edu/metadata/repo"
  xmlns:rpm="http://linux.duke.edu/metadata/rpm">
  <revision>1</revision>
  <data type="primary"><checksum type="sha256">{SHA}</checksum>
    <location href="repodata/{SHA}-primary.xml.gz"/><size>10</size></data>
</repomd>
""".encode()
PRIMARY = f"""<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://linux.duke.edu/metadata/common"
  xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="1">
<package type="rpm">
  <name>zlib-devel</name><arch>x86_64</arch>
  <version epoch="0" ver="1.3" rel="1"/>
  <checksum type="sha256" pkgid="YES">{SHA}</checksum>
  <location href="Packages/zlib-devel-1.3-1.x86_64.rpm"/>
  <size package="1234" installed="1" archive="1"/>
  <format>
    <rpm:provides><rpm:entry name="pkgconfig(zlib)" flags="EQ" epoch="0" ver="1.3"/></rpm:provides>
    <rpm:requires><rpm:entry name="/usr/bin/pkg-config"/>
      <rpm:entry name="rpmlib(X)" flags="LE" epoch="0" ver="4"/></rpm:requires>
    <file>/usr/include/zlib.h</file>
  </format>
</package>
</metadata>
""".encode()


def pkg(name: str, version: str = "1.0", *, provides: tuple[Dep, ...] = (),
        requires: tuple[Dep, ...] = (), arch: str = "noarch") -> RepoPackage:
    return RepoPackage(name, 0, version, "1", arch, SHA, f"Packages/{name}.rpm", 10,
                       provides, requires, ())


def test_repomd_and_primary_parse() -> None:
    files = parse_repomd(REPOMD)
    assert files["primary"].sha256 == SHA
    (package,) = parse_primary(gzip.compress(PRIMARY), files["primary"].href)
    assert package.nevra == "zlib-devel-1.3-1.x86_64"
    assert package.provides == (Dep("pkgconfig(zlib)", "=", "0:1.3"),)
    assert Dep("/usr/bin/pkg-config") in package.requires
    assert package.files == ("/usr/include/zlib.h",)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<repomd/>",
        REPOMD.replace(b'type="sha256"', b'type="md5"'),
        REPOMD.replace(b"repodata/", b"../"),
        b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>',
        REPOMD + b"trailing",
    ],
)
def test_bad_repomd_is_bad_metadata(data: bytes) -> None:
    with pytest.raises(BadMetadataError):
        parse_repomd(data)


def test_a_gzip_bomb_is_stopped_at_the_bound() -> None:
    bomb = gzip.compress(b"<" * (4 << 20))
    with pytest.raises(BadMetadataError, match="decompresses to more than"):
        parse_primary(bomb, "x-primary.xml.gz", MetadataLimits(max_decompressed_bytes=1 << 20))


def test_primary_with_an_escaping_location_is_refused() -> None:
    data = PRIMARY.replace(b"Packages/zlib", b"../../zlib")
    with pytest.raises(BadMetadataError, match="unsafe location"):
        parse_primary(data, "primary.xml")


def test_comps_groups() -> None:
    comps = (b"<comps><group><id>buildsys-build</id><packagelist>"
             b"<packagereq type='mandatory'>gcc</packagereq>"
             b"<packagereq type='optional'>emacs</packagereq>"
             b"<packagereq>make</packagereq></packagelist></group></comps>")
    assert parse_comps(comps, "comps.xml") == {"buildsys-build": ("gcc", "make")}


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.10", "1.9", 1), ("1.0a", "1.0", 1),
        ("1.0~rc1", "1.0", -1), ("1.0^git1", "1.0", 1), ("1.0^git1", "1.0.1", -1),
        ("2", "10", -1), ("a", "1", -1), ("1.0.0", "1.0", 1),
    ],
)
def test_rpmvercmp(a: str, b: str, expected: int) -> None:
    assert rpmvercmp(a, b) == expected
    assert rpmvercmp(b, a) == -expected


def test_evr_epoch_wins_and_missing_release_matches() -> None:
    assert compare_evr("1:1.0-1", "2.0-1") == 1
    assert compare_evr("1.0", "1.0-5") == 0


def test_resolver_takes_the_host_first_then_the_repositories() -> None:
    host = HostBase.of([Dep("gcc", "=", "4:12.2.0-14")], ["/usr/bin/pkg-config"])
    devel = pkg("foo-devel", provides=(Dep("pkgconfig(foo)", "=", "1.0"),),
                requires=(Dep("/usr/bin/pkg-config"), Dep("foo-libs", ">=", "1.0"),
                          Dep("rpmlib(FileDigests)", "<=", "4.6.0-1")))
    libs = pkg("foo-libs", "1.2")
    old_libs = pkg("foo-libs", "0.9")
    got = resolve([Dep("gcc", ">=", "12"), Dep("pkgconfig(foo)")],
                  [[devel, old_libs, libs]], host, "x86_64")
    assert [p.nevra for _, p in got.packages] == ["foo-devel-1.0-1.noarch",
                                                  "foo-libs-1.2-1.noarch"]
    assert got.from_host == (Dep("/usr/bin/pkg-config"), Dep("gcc", ">=", "12"))


def test_resolver_prefers_the_first_repository_and_skips_other_arches() -> None:
    first, second = pkg("bar", "1.0"), pkg("bar", "9.0")
    other_arch = pkg("baz", arch="s390x")
    got = resolve([Dep("bar")], [[first], [second, other_arch]], HostBase.of([]), "x86_64")
    assert [p.nevra for _, p in got.packages] == ["bar-1.0-1.noarch"]
    with pytest.raises(MissingBuildDependencyError, match="missing-build-dependency: baz"):
        resolve([Dep("baz")], [[other_arch]], HostBase.of([]), "x86_64")


def test_resolver_names_what_is_missing_and_who_needs_it() -> None:
    devel = pkg("foo-devel", requires=(Dep("libfoo.so.1()(64bit)"),))
    with pytest.raises(MissingBuildDependencyError) as caught:
        resolve([Dep("foo-devel")], [[devel]], HostBase.of([]), "x86_64")
    assert caught.value.dependency == "libfoo.so.1()(64bit)"
    assert "needed by foo-devel-1.0-1.noarch" in str(caught.value)
    with pytest.raises(MissingBuildDependencyError, match="foo-devel >= 2"):
        resolve([Dep("foo-devel", ">=", "2")], [[devel]], HostBase.of([]), "x86_64")


def test_host_facts_are_honest_and_deterministic() -> None:
    facts = HostFacts(dpkg=(("gcc", "4:12.2.0-3"), ("libc6-dev", "2.36-9+deb12u4")),
                      pkgconfig=(("zlib", "1.2.13"),), files=("/usr/bin/gcc",))
    provided = {str(d) for d in facts.provides()}
    assert {"gcc = 4:12.2.0-3", "glibc-devel = 2.36-9+deb12u4", "deb(gcc) = 4:12.2.0-3",
            "pkgconfig(zlib) = 1.2.13"} <= provided
    assert "make = 4.3-4.1" not in provided  # not installed, not provided
    assert facts.spec_text() == HostFacts(facts.dpkg, facts.pkgconfig, facts.files).spec_text()
    changed = HostFacts((("gcc", "4:12.2.0-4"), *facts.dpkg[1:]), facts.pkgconfig, facts.files)
    assert changed.nevra != facts.nevra
    assert _rpm_evr("1:2.3-rc-1+b1") == "1:2.3_rc-1+b1"


def test_usr_union_binds_only_where_the_trees_meet(tmp_path: Path) -> None:
    host, root = tmp_path / "host", tmp_path / "root"
    (host / "bin").mkdir(parents=True)
    (host / "include" / "sys").mkdir(parents=True)
    (host / "include" / "stdio.h").write_text("")
    (host / "lib64").symlink_to("lib")
    (root / "include").mkdir(parents=True)
    (root / "include" / "foo.h").write_text("")
    (root / "include" / "stdio.h").write_text("")
    args = usr_union(host, root)
    assert args == [
        "--tmpfs", "/usr",
        "--ro-bind", str(host / "bin"), "/usr/bin",
        "--dir", "/usr/include",
        "--ro-bind", str(root / "include" / "foo.h"), "/usr/include/foo.h",
        "--ro-bind", str(root / "include" / "stdio.h"), "/usr/include/stdio.h",
        "--ro-bind", str(host / "include" / "sys"), "/usr/include/sys",
        "--symlink", "lib", "/usr/lib64",
    ]
