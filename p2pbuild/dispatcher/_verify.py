"""Verification: do replicas from different operators agree bit for bit? (design item 10)

Pure functions over signed results. Two results *agree* when they list the same artifact
names with the same sizes and SHA-256 digests (logs and build environment may differ)
*and* ran in the same buildroot (equal signed buildroot records: the same installed
packages and repository digests, or both without a buildroot). Results from different
buildroots never verify each other, even with identical artifacts. A
build is *verified* when two results from different operators (as the trust list names
them) agree: one operator's ten nodes count once, so two nodes of one operator never verify
each other.

:func:`assess` looks at the successful replicas so far and says what to do next:

* :class:`Verified` -- two operators agree; the two results are the proof, every replica
  outside the agreeing group is an outlier.
* :class:`NeedTieBreak` -- results from different operators disagree: run the job on an
  operator not yet involved; whichever group it joins wins.
* :class:`NeedReplicas` -- not enough agreeing operators yet (no disagreement).

:func:`difference_report` renders what differs between groups, file by file;
:func:`diffoscope_report` adds a ``diffoscope`` report when that tool is on ``PATH``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from .._identity import PublicKey
from .._jobs import Result, ResultState

__all__ = [
    "NeedReplicas",
    "NeedTieBreak",
    "Replica",
    "Verdict",
    "Verified",
    "artifact_key",
    "assess",
    "difference_report",
    "diffoscope_report",
    "with_diffoscope",
]


@attrs.frozen
class Replica:
    """One node's signed, successful result, with the operator the trust list names."""

    node: PublicKey
    operator: str
    result: Result
    #: Opaque id of the attempt (the engine's row id), carried through to the verdict.
    attempt: int = 0


def artifact_key(result: Result) -> str:
    """A digest of the artifact list (names, sizes, SHA-256) and of the buildroot record:
    equal iff results agree."""
    h = hashlib.sha256()
    for item in result.artifacts:
        h.update(item.name.encode() + b"\x00" + str(item.size).encode() + b"\x00" + item.sha256)
    if result.buildroot is not None:
        h.update(b"\x01buildroot\x00" + bytes.fromhex(result.buildroot.key))
    return h.hexdigest()


def _buildroot_lines(groups: Sequence[Sequence[Replica]]) -> list[str]:
    """How the groups' buildroots differ: repository digests and packages, per group."""
    records = [g[0].result.buildroot for g in groups]
    if len({None if r is None else r.key for r in records}) == 1:
        return []
    lines = ["", "The replicas ran in different buildroots; results from different "
             "buildroots never verify each other."]
    for index, record in enumerate(records, start=1):
        if record is None:
            lines.append(f"  group {index}: no buildroot (built on the node's host)")
    present = [r for r in records if r is not None]
    repos = sorted({name for r in present for name, _ in r.repos})
    for name in repos:
        digests = [
            next((d.hex() for n, d in r.repos if n == name), "(not used)") if r else "-"
            for r in records
        ]
        if len(set(digests)) > 1:
            lines.append(f"repository {name} (repomd.xml SHA-256)")
            lines += [f"  group {i}: {d}" for i, d in enumerate(digests, start=1)]
    packages = sorted({p.nevra for r in present for p in r.packages})
    for nevra in packages:
        digests = []
        for r in records:
            match = next((p for p in r.packages if p.nevra == nevra), None) if r else None
            digests.append("(not installed)" if match is None else match.sha256.hex())
        if len(set(digests)) > 1:
            lines.append(f"package {nevra}")
            lines += [f"  group {i}: {d}" for i, d in enumerate(digests, start=1)]
    return lines


@attrs.frozen
class Verified:
    #: The two agreeing results from different operators (the proof), first by attempt.
    proof: tuple[Replica, Replica]
    #: Every replica in the winning group (including the proof).
    agreeing: tuple[Replica, ...]
    outliers: tuple[Replica, ...]


@attrs.frozen
class NeedTieBreak:
    """Operators disagree. ``operators`` are all operators involved so far (the tie-break
    must come from another); ``groups`` the disagreeing groups."""

    operators: frozenset[str]
    groups: tuple[tuple[Replica, ...], ...]


@attrs.frozen
class NeedReplicas:
    """No disagreement, not yet two operators agreeing: ``missing`` more operators needed."""

    missing: int
    operators: frozenset[str]


Verdict = Verified | NeedTieBreak | NeedReplicas


def _groups(replicas: Sequence[Replica]) -> list[list[Replica]]:
    groups: dict[str, list[Replica]] = {}
    for replica in sorted(replicas, key=lambda r: r.attempt):
        groups.setdefault(artifact_key(replica.result), []).append(replica)
    return list(groups.values())


def assess(replicas: Sequence[Replica], wanted: int = 2) -> Verdict:
    """Judge the successful replicas of one job. Results that did not succeed are ignored
    (pass only ``succeeded`` ones). ``wanted`` is how many operators the build asked for;
    verification needs two of them to agree.
    """
    good = [r for r in replicas if r.result.state is ResultState.SUCCEEDED]
    groups = _groups(good)
    for group in sorted(groups, key=lambda g: -len({r.operator for r in g})):
        first = group[0]
        second = next((r for r in group if r.operator != first.operator), None)
        if second is not None:
            agreeing = tuple(group)
            outliers = tuple(r for r in good if r not in group)
            return Verified((first, second), agreeing, outliers)
    operators = frozenset(r.operator for r in good)
    if len(groups) >= 2:
        # Differing outputs; but two groups from the *same* operator are not a conflict
        # between operators: that operator is merely unreproducible with itself.
        group_operators = [{r.operator for r in g} for g in groups]
        if len(set.union(*group_operators)) >= 2:
            return NeedTieBreak(operators, tuple(tuple(g) for g in groups))
    return NeedReplicas(max(wanted, 2) - len(operators), operators)


def _describe(replica: Replica) -> str:
    return f"{replica.node.fingerprint} ({replica.operator})"


def difference_report(groups: Sequence[Sequence[Replica]]) -> str:
    """A readable report of how result groups differ: per file, the digest each group has.

    Each group is a list of replicas that agree with each other.
    """
    lines = ["Replicas disagree on their artifacts or buildroots.", ""]
    for index, group in enumerate(groups, start=1):
        lines.append(f"group {index}: " + ", ".join(_describe(r) for r in group))
    lines.append("")
    names = sorted({a.name for g in groups for a in g[0].result.artifacts})
    for name in names:
        digests = []
        for g in groups:
            item = g[0].result.artifact(name)
            digests.append("(missing)" if item is None else f"{item.sha256.hex()} {item.size}")
        if len(set(digests)) == 1:
            continue
        lines.append(f"{name}")
        for index, digest in enumerate(digests, start=1):
            lines.append(f"  group {index}: {digest}")
    same = [
        n for n in names
        if len({str(g[0].result.artifact(n)) for g in groups}) == 1
    ]
    if same:
        lines.append("")
        lines.append(f"identical in every group: {', '.join(same)}")
    lines += _buildroot_lines(groups)
    return "\n".join(lines) + "\n"


async def diffoscope_report(
    left: Path, right: Path, *, timeout: float = 120.0, max_bytes: int = 1024 * 1024
) -> str | None:
    """``diffoscope``'s text report comparing two files, or None when diffoscope is not on
    ``PATH``, did not finish within ``timeout``, or could not run. At most ``max_bytes``."""
    tool = shutil.which("diffoscope")
    if tool is None:
        return None
    with trio.move_on_after(timeout):
        try:
            done = await trio.run_process(
                [tool, "--text", "-", str(left), str(right)],
                capture_stdout=True, capture_stderr=True, check=False,
            )
        except OSError:
            return None
        out: bytes = done.stdout
        return out[:max_bytes].decode("utf-8", "replace")
    return None


async def with_diffoscope(
    report: str, groups: Sequence[Sequence[Replica]], work_dir: Callable[[int], Path]
) -> str:
    """``report`` with ``diffoscope``'s comparison of the first artifact that differs
    between the first two groups appended (when diffoscope is there and finds one);
    ``work_dir(attempt)`` is where an attempt's artifacts were downloaded."""
    first, second = groups[0][0], groups[1][0]
    for item in first.result.artifacts:
        other = second.result.artifact(item.name)
        if other is not None and other.sha256 != item.sha256:
            left = work_dir(first.attempt) / item.name
            right = work_dir(second.attempt) / item.name
            text = await diffoscope_report(left, right)
            if text:
                return f"{report}\ndiffoscope {item.name}:\n{text}"
            break
    return report
