"""Hypothesis strategies for p2pbuild's core values (in the manner of attrs' tests/strategies.py).

Keys come from a small fixed set of throwaway identities, so examples shrink well and every
run signs with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import strategies as st

from p2pbuild import (
    Capability,
    Identity,
    MachineType,
    P2PBuildError,
    Role,
    SignedRecord,
    Status,
    TrustEntry,
    TrustList,
)
from p2pbuild.testing import make_identity

T0 = 1_700_000_000

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def value_or_our_error(parse: Callable[[_In], _Out], data: _In) -> _Out | None:
    """``parse(data)``, or None where it raises our own error (with a code a daemon can
    count). Any other exception propagates: a parser must not raise anything else."""
    try:
        return parse(data)
    except P2PBuildError as exc:
        code = exc.code
    assert isinstance(code, str) and code
    return None


IDENTITIES = tuple(make_identity(f"strategy-node-{i}") for i in range(4))
MAINTAINERS = tuple(make_identity(f"strategy-maintainer-{i}", Role.MAINTAINER) for i in range(5))

tokens = st.one_of(
    st.sampled_from(["x86_64", "aarch64", "s390x", "fedora-41", "rpm", "make", "a", "0.9+b"]),
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True),
)
token_tuples = st.lists(tokens, max_size=4, unique=True).map(lambda items: tuple(sorted(items)))
printable_text = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=30
).filter(str.isprintable)
# Cheaper to draw than regular expressions, for the many entries of a trust list.
operators = st.sampled_from(["alice", "bob", "farm-1", "x.y@example.org", "Z+9"])
small_token_tuples = st.lists(
    st.sampled_from(["aarch64", "fedora", "s390x", "team-a", "x86_64"]), max_size=3, unique=True
).map(lambda items: tuple(sorted(items)))
endpoints = st.one_of(
    st.just(("", b"")),
    st.tuples(
        st.from_regex(r"https://[a-z0-9.-]{1,30}:[0-9]{1,5}", fullmatch=True),
        st.binary(min_size=32, max_size=32),
    ),
)

# Most nodes are always on (the shorter wire form); on-demand ones carry a wake-up.
wake_fields = st.one_of(
    st.just({}),
    st.fixed_dictionaries({
        "wake_s": st.integers(1, 3600),
        "wake_url": st.one_of(
            st.just(""), st.from_regex(r"https://[a-z0-9.-]{1,30}/wake", fullmatch=True)
        ),
    }),
)


@st.composite
def capabilities(draw: st.DrawFn) -> Capability:
    endpoint, tls = draw(endpoints)
    return Capability(
        arch=draw(tokens),
        os=draw(tokens),
        cpus=draw(st.integers(0, 4095)),
        cpu_model=draw(printable_text),
        memory_mb=draw(st.integers(0, 2**32 - 1)),
        disk_mb=draw(st.integers(0, 2**32 - 1)),
        machine=draw(st.sampled_from(MachineType)),
        build_types=draw(token_tuples),
        pools=draw(token_tuples),
        endpoint=endpoint,
        tls_sha256=tls,
        **draw(wake_fields),
    )


@st.composite
def statuses(draw: st.DrawFn) -> Status:
    total = draw(st.integers(0, 4095))
    return Status(
        load_milli=draw(st.integers(0, 2**32 - 1)),
        slots_total=total,
        slots_free=draw(st.integers(0, total)),
        running=draw(st.integers(0, 4095)),
        uptime_s=draw(st.integers(0, 2**63 - 1)),
        draining=draw(st.booleans()),
        standby=draw(st.booleans()),
    )


bodies = st.one_of(capabilities(), statuses())


@st.composite
def records(draw: st.DrawFn, body: st.SearchStrategy[Any] = bodies) -> SignedRecord:
    """Valid records, acceptable at ``T0`` under the default policy."""
    value = draw(body)
    identity: Identity = draw(st.sampled_from(IDENTITIES))
    lifetime_limit = 24 * 3600 if isinstance(value, Capability) else 30 * 60
    return SignedRecord.create(
        identity,
        value,
        seq=draw(st.integers(0, 2**63 - 1)),
        issued_at=draw(st.integers(T0 - lifetime_limit + 1, T0 + 300)),
        lifetime=lifetime_limit,
    )


@st.composite
def trust_lists(draw: st.DrawFn, *, signed: bool = True) -> TrustList:
    """Valid trust lists (expiring after ``T0``), signed by exactly their threshold."""
    n = draw(st.integers(1, len(MAINTAINERS)))
    maintainers = MAINTAINERS[:n]
    threshold = draw(st.integers(1, n))
    entries = [TrustEntry(m.public_key, Role.MAINTAINER, "maintainers") for m in maintainers]
    for i, role in enumerate(draw(st.lists(st.sampled_from([Role.NODE, Role.DISPATCHER]),
                                           max_size=4))):
        entries.append(
            TrustEntry(
                make_identity(f"strategy-entry-{i}").public_key,
                role,
                draw(operators),
                draw(small_token_tuples),
                draw(small_token_tuples),
            )
        )
    trust = TrustList(
        draw(st.integers(1, 2**32)),
        draw(st.integers(T0 + 1, 2**40)),
        threshold,
        tuple(sorted(entries, key=lambda e: e.key)),
    )
    if signed:
        for maintainer in draw(st.permutations(maintainers))[:threshold]:
            trust = trust.sign(maintainer)
    return trust
