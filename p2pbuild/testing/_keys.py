"""Throwaway identities and trust lists for tests, demos and benchmarks.

Keys are derived from a label, so a test that names its keys gets the same ones every run;
none of them is ever a real deployment's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs

from .._identity import Identity, Role
from .._records import Capability, MachineType, Status
from .._trust import TrustEntry, TrustList

__all__ = [
    "TrustFixture",
    "example_capability",
    "example_status",
    "make_identity",
    "make_trust_list",
]


def make_identity(label: str, role: Role = Role.NODE) -> Identity:
    """A deterministic throwaway identity: the same ``label`` gives the same key."""
    seed = hashlib.sha256(b"p2pbuild-testing-key\x00" + label.encode()).digest()
    return Identity.from_seed(seed, role)


@attrs.frozen
class TrustFixture:
    """A signed trust list together with the private keys behind it."""

    trust_list: TrustList
    maintainers: tuple[Identity, ...]
    nodes: dict[str, Identity]
    dispatchers: dict[str, Identity]


def make_trust_list(
    *,
    maintainers: int = 3,
    threshold: int = 2,
    nodes: Sequence[tuple[str, str]] = (("node-1", "alice"), ("node-2", "bob")),
    dispatchers: Sequence[tuple[str, str]] = (("dispatcher-1", "farm"),),
    version: int = 1,
    expires_at: int = 2**40,
    label: str = "",
) -> TrustFixture:
    """A trust list signed by ``threshold`` of ``maintainers`` throwaway maintainers.

    ``nodes`` and ``dispatchers`` are ``(name, operator)`` pairs; their identities are
    returned by name.
    """
    maintainer_ids = tuple(
        make_identity(f"{label}maintainer-{i}", Role.MAINTAINER) for i in range(maintainers)
    )
    node_ids = {name: make_identity(label + name, Role.NODE) for name, _ in nodes}
    dispatcher_ids = {
        name: make_identity(label + name, Role.DISPATCHER) for name, _ in dispatchers
    }
    entries = [TrustEntry(m.public_key, Role.MAINTAINER, "maintainers") for m in maintainer_ids]
    entries += [TrustEntry(node_ids[name].public_key, Role.NODE, op) for name, op in nodes]
    entries += [
        TrustEntry(dispatcher_ids[name].public_key, Role.DISPATCHER, op)
        for name, op in dispatchers
    ]
    trust = TrustList(version, expires_at, threshold, tuple(sorted(entries, key=lambda e: e.key)))
    for maintainer in maintainer_ids[:threshold]:
        trust = trust.sign(maintainer)
    return TrustFixture(trust, maintainer_ids, node_ids, dispatcher_ids)


def example_capability(
    *,
    arch: str = "x86_64",
    os: str = "fedora-41",
    machine: MachineType = MachineType.VM,
    pools: Sequence[str] = (),
    endpoint: str = "https://127.0.0.1:8443",
) -> Capability:
    """A plausible capability body for tests."""
    return Capability(
        arch=arch,
        os=os,
        cpus=8,
        cpu_model="Example CPU @ 3.0GHz",
        memory_mb=16384,
        disk_mb=100_000,
        machine=machine,
        build_types=("make", "rpm"),
        pools=tuple(sorted(pools)),
        endpoint=endpoint,
        tls_sha256=bytes(range(32)) if endpoint else b"",
    )


def example_status(*, slots_free: int = 2, draining: bool = False) -> Status:
    """A plausible status body for tests."""
    return Status(
        load_milli=250, slots_total=4, slots_free=slots_free, running=4 - slots_free,
        uptime_s=3600, draining=draining,
    )
