"""The buildroot resolver: which packages a buildroot needs. Pure, no I/O.

Input: what the build asks for (the job's base set and the SRPM's BuildRequires), the
packages of the pinned repositories in priority order, and what the node's host base
already provides (:class:`HostBase`). Output: the closed set of repository packages to
install, or :class:`MissingBuildDependencyError` naming what nothing provides.

Rules (docs/build-execution.md, *Buildroots*):

* ``rpmlib(...)`` requirements are rpm's own features, always met.
* A requirement the host base meets is taken from the host: the host's ``/usr`` is the
  base system the buildroot stands on, so the repositories add only what it lacks.
* Otherwise the first repository (job order) with a package providing it wins, and in that
  repository the highest version, then the name, then ``noarch`` before the target arch;
  packages of other arches are never candidates.
* Each chosen package's requirements are resolved the same way until nothing is missing.
  One version per package name: a second, different one is a conflict (reported as a
  missing dependency, because no consistent set provides it).

Conflicts, obsoletes and weak dependencies are not looked at; the install step
(``dnf --installroot``) re-checks the set and fails the build if it disagrees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ._errors import MissingBuildDependencyError
from ._repodata import Dep, RepoPackage, compare_evr, satisfies

__all__ = ["HostBase", "Resolution", "resolve"]


@attrs.frozen
class HostBase:
    """What the host's base system provides: capabilities (``gcc = 12.2.0-14``,
    ``pkgconfig(zlib) = 1.2.13``) by name, and files (``/usr/bin/make``)."""

    capabilities: Mapping[str, tuple[Dep, ...]]
    files: frozenset[str]

    @classmethod
    def of(cls, provides: Iterable[Dep], files: Iterable[str] = ()) -> HostBase:
        index: dict[str, list[Dep]] = {}
        for dep in provides:
            index.setdefault(dep.name, []).append(dep)
        return cls({k: tuple(v) for k, v in index.items()}, frozenset(files))

    def provides(self, wanted: Dep) -> bool:
        if wanted.name.startswith("/") and wanted.name in self.files:
            return True
        return any(satisfies(p, wanted) for p in self.capabilities.get(wanted.name, ()))


@attrs.frozen
class Resolution:
    """The packages to install (repository index, package), sorted by NEVRA, and the
    requirements the host base met."""

    packages: tuple[tuple[int, RepoPackage], ...]
    from_host: tuple[Dep, ...]


def _provides(pkg: RepoPackage, wanted: Dep) -> bool:
    if wanted.name.startswith("/") and wanted.name in pkg.files:
        return True
    if wanted.name == pkg.name and satisfies(Dep(pkg.name, "=", pkg.evr), wanted):
        return True
    return any(satisfies(p, wanted) for p in pkg.provides)


def resolve(
    requests: Sequence[Dep],
    repos: Sequence[Sequence[RepoPackage]],
    host: HostBase,
    arch: str,
) -> Resolution:
    """Resolve ``requests`` against ``repos`` (priority order) on top of ``host`` for
    ``arch``. Raises :class:`MissingBuildDependencyError` naming the first requirement
    nothing provides."""
    index: dict[str, list[tuple[int, RepoPackage]]] = {}
    for repo_index, packages in enumerate(repos):
        for pkg in packages:
            if pkg.arch not in ("noarch", arch):
                continue
            names = {pkg.name, *(p.name for p in pkg.provides), *pkg.files}
            for name in names:
                index.setdefault(name, []).append((repo_index, pkg))
    chosen: dict[str, tuple[int, RepoPackage]] = {}
    from_host: set[Dep] = set()
    queue: deque[tuple[Dep, str | None]] = deque((dep, None) for dep in requests)
    while queue:
        dep, needed_by = queue.popleft()
        if dep.name.startswith("rpmlib("):
            continue
        if any(_provides(pkg, dep) for _, pkg in chosen.values()):
            continue
        if host.provides(dep):
            from_host.add(dep)
            continue
        candidates = [(i, p) for i, p in index.get(dep.name, ()) if _provides(p, dep)]
        if not candidates:
            where = f" (needed by {needed_by})" if needed_by else ""
            raise MissingBuildDependencyError(
                str(dep), f"missing-build-dependency: {dep}{where}"
            )
        best = _best(candidates, arch)
        repo_index, pkg = best
        if pkg.name in chosen:
            raise MissingBuildDependencyError(
                str(dep),
                f"missing-build-dependency: {dep} (only {pkg.nevra} provides it, which "
                f"conflicts with {chosen[pkg.name][1].nevra})",
            )
        chosen[pkg.name] = best
        queue.extend((req, pkg.nevra) for req in pkg.requires)
    return Resolution(
        packages=tuple(sorted(chosen.values(), key=lambda item: item[1].nevra)),
        from_host=tuple(sorted(from_host)),
    )


def _best(candidates: list[tuple[int, RepoPackage]], arch: str) -> tuple[int, RepoPackage]:
    first_repo = min(i for i, _ in candidates)
    pool = [(i, p) for i, p in candidates if i == first_repo]
    best = pool[0]
    for item in pool[1:]:
        if _better(item[1], best[1], arch):
            best = item
    return best


def _better(a: RepoPackage, b: RepoPackage, arch: str) -> bool:
    cmp = compare_evr(a.evr, b.evr)
    if cmp:
        return cmp > 0
    if a.name != b.name:
        return a.name < b.name
    return a.arch == "noarch" and b.arch == arch
