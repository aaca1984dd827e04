"""Attacks on the trust list: rolled back, unsigned, under-signed, expired, rotated without
the old threshold; and a revoked key that keeps publishing or signing jobs."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio

from p2pbuild import (
    Job,
    RemoteError,
    Role,
    SignedRecord,
    TrustEntry,
    TrustList,
    accept_update,
)
from p2pbuild.dht import Query
from p2pbuild.testing import (
    example_capability,
    example_status,
    make_identity,
    make_trust_list,
    open_cluster,
)
from p2pbuild.testing._farm import start_push_node
from p2pbuild.testing._runner import InstantRunner

NOW = 1_700_000_000.0
BASE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("revoked", "eve")],
                       expires_at=int(NOW) + 86400, label="trust-adv-")
V1 = BASE.trust_list
M = BASE.maintainers  # three maintainers, threshold 2


def _signed(draft: TrustList, *signers: object) -> TrustList:
    for signer in signers:
        draft = draft.sign(signer)  # type: ignore[arg-type]
    return draft


def _v2() -> TrustList:
    return _signed(V1.without_entry(BASE.nodes["revoked"].public_key).next_version(), M[0], M[1])


def _code(current: TrustList, offered: TrustList, now: float = NOW) -> str:
    with pytest.raises(RemoteError) as caught:
        accept_update(current, offered, now)
    return caught.value.code


def test_trust_list_updates_that_must_fail() -> None:
    v2 = _v2()
    assert accept_update(V1, v2, NOW) is v2  # the honest rotation works
    # Rolled back: an attacker replays v1, which still lists the revoked key.
    assert _code(v2, V1) == "rollback"
    # Unsigned and under-signed (1 of a threshold of 2).
    assert _code(V1, V1.without_entry(M[2].public_key).next_version()) == "under-signed"
    assert _code(V1, _signed(V1.next_version(), M[0])) == "under-signed"
    # A forged signature (bytes changed after signing) is refused as a whole.
    tampered = v2.with_entry(TrustEntry(make_identity("intruder").public_key, Role.NODE, "eve"))
    tampered = TrustList(tampered.version, tampered.expires_at, tampered.threshold,
                         tampered.entries, v2.signatures)
    assert _code(V1, tampered) == "bad-trust-signature"
    # Expired: a new version that is already past its expiry.
    stale = _signed(attrs_evolve(V1.next_version(), expires_at=int(NOW) - 1), M[0], M[1])
    assert _code(V1, stale) == "expired"
    # Skipped version.
    v3 = _signed(attrs_evolve(v2.next_version(), version=4), M[0], M[1])
    assert _code(V1, v3) == "bad-rotation"
    # Rotated without the old threshold: new maintainers sign themselves in.
    usurpers = [make_identity(f"usurper-{i}", Role.MAINTAINER) for i in range(3)]
    entries = [e for e in V1.entries if e.role is not Role.MAINTAINER]
    entries += [TrustEntry(u.public_key, Role.MAINTAINER, "usurpers") for u in usurpers]
    draft = TrustList(V1.version + 1, V1.expires_at, 2,
                      tuple(sorted(entries, key=lambda e: e.key)))
    hijack = _signed(draft, usurpers[0], usurpers[1], M[0])  # one old maintainer only
    hijack.verify(NOW)  # valid on its own ...
    assert _code(V1, hijack) == "bad-rotation"  # ... but not a successor of v1
    # Every refusal leaves the trusted list as it was: v1 remains valid and trusted.
    V1.verify(NOW)


def attrs_evolve(trust: TrustList, **changes: object) -> TrustList:
    import attrs

    return attrs.evolve(trust, **changes)  # type: ignore[arg-type]


async def test_revoked_node_that_keeps_publishing_is_ignored_and_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    fixture = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("revoked", "eve")],
                              label="trust-dir-")
    v2 = _signed(fixture.trust_list.without_entry(fixture.nodes["revoked"].public_key)
                 .next_version(), *fixture.maintainers[:2])
    async with open_cluster(20, seed=4) as cluster:
        now = int(cluster.nodes[0].now())
        for index, name in enumerate(("n1", "n2", "revoked")):
            identity = fixture.nodes[name]
            await cluster.nodes[index].publish([
                SignedRecord.create(identity, example_capability(), seq=1, issued_at=now,
                                    lifetime=3600),
                SignedRecord.create(identity, example_status(), seq=1, issued_at=now,
                                    lifetime=600),
            ])
        reader = cluster.nodes[9]
        # Under v1 all three are trusted; under v2 the revoked key is not, though its
        # records are genuine and stored (a DHT node does not filter by trust).
        assert len(await reader.find(Query(arch="x86_64"), fixture.trust_list)) == 3
        before = reader.statistics().rejected.get("untrusted-key", 0)
        found = await reader.find(Query(arch="x86_64"), v2)
        assert {e.publisher for e in found} == {
            fixture.nodes["n1"].public_key, fixture.nodes["n2"].public_key
        }
        assert reader.statistics().rejected["untrusted-key"] == before + 1
        # The revoked key republishes with a higher seq: still ignored.
        identity = fixture.nodes["revoked"]
        await cluster.nodes[2].publish([
            SignedRecord.create(identity, example_capability(), seq=2, issued_at=now + 1,
                                lifetime=3600),
        ])
        assert len(await reader.find(Query(arch="x86_64"), v2)) == 2


@pytest.mark.slow
async def test_node_refuses_jobs_from_a_revoked_dispatcher(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fixture = make_trust_list(dispatchers=[("d1", "farm"), ("d-old", "farm")], label="trust-job-")
    old = fixture.dispatchers["d-old"]
    v2 = _signed(fixture.trust_list.without_entry(old.public_key).next_version(),
                 *fixture.maintainers[:2])
    node_identity = fixture.nodes["node-1"]
    node = await start_push_node(nursery, tmp_path / "n", node_identity, v2, InstantRunner())
    from p2pbuild import BuildType, JobSpec, SourceArtifact, Target

    spec = JobSpec(SourceArtifact("x.tar.gz", 1, b"\x00" * 32), BuildType.MAKE,
                   Target("x86_64", "fedora-41"))
    job = Job.create(old, spec, issued_at=int(time.time()), lifetime=600,
                     node=node_identity.public_key)
    with pytest.raises(RemoteError) as caught:
        node.service.submit(job.to_bytes())
    assert caught.value.code == "untrusted-key"
    assert dict(node.service.statistics().rejected)["untrusted-key"] == 1
    fresh = Job.create(fixture.dispatchers["d1"], spec, issued_at=int(time.time()), lifetime=600,
                       node=node_identity.public_key, nonce=random.Random(1).randbytes(16))
    assert node.service.submit(fresh.to_bytes()).job_id
