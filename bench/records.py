"""How much record decoding and checking cost on top of the ed25519 check itself.

Prints one JSON object to stdout. The headline figure is ``ratio``: records per second
through the full acceptance path (:func:`p2pbuild.decode_record`: size check, decode,
canonical-encoding check, every field typed and bounded, signature, time checks) divided by
raw PyNaCl verifications per second of the same messages with ``VerifyKey(pk).verify``. The
goal is at least 0.9, that is decoding and checks cost under 10% over the signature itself.
The same ratio against ``nacl.bindings.crypto_sign_open``, the lower-level call that
p2pbuild's verification uses, is reported too.

Method, for a noisy machine: all three measurements run on the same batch of *distinct*
valid records (many publishers, distinct ``seq``: nothing can be cached from one record to
the next). Each round walks the batch in chunks of 50 records and times the decoder and both
raw verifications on every chunk, in a rotating order, with the garbage collector off; so a
burst of load from elsewhere lands on all three alike. Ratios are computed per round and
the report gives the median over rounds (and the spread).

Also reported: the time to parse and verify a realistic trust list (3 maintainers, 200
entries), and to check a rotation to its next version.

Usage: ``python bench/records.py [--short] [--rounds N] [--records N]``. ``--short`` is the
CI mode (about two seconds); the default runs longer for steadier figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import nacl
import nacl.bindings
import nacl.signing

import p2pbuild
from p2pbuild import Domain, Role, SignedRecord, TrustEntry, TrustList, decode_record
from p2pbuild.testing import example_capability, example_status, make_identity

GOAL = 0.9
NOW = 1_700_000_000


def _records(kind: str, count: int, publishers: int) -> list[bytes]:
    """``count`` distinct valid records of ``kind`` from ``publishers`` throwaway keys."""
    identities = [make_identity(f"bench-node-{i}") for i in range(publishers)]
    records = []
    for i in range(count):
        identity = identities[i % publishers]
        if kind == "capability":
            body: Any = example_capability(
                arch=("x86_64", "aarch64", "s390x", "ppc64le")[i % 4],
                pools=("fedora",) if i % 3 == 0 else (),
            )
            lifetime = 6 * 3600
        else:
            body = example_status(slots_free=i % 5)
            lifetime = 600
        record = SignedRecord.create(
            identity, body, seq=i + 1, issued_at=NOW - 60, lifetime=lifetime
        )
        records.append(record.raw)
    return records


def _signed_parts(raw: bytes, kind: str) -> tuple[bytes, bytes, bytes]:
    """(public key, domain-prefixed signed message, signature) of a record, for the raw
    baselines: exactly the bytes the decoder verifies."""
    domain = Domain.RECORD_CAPABILITY if kind == "capability" else Domain.RECORD_STATUS
    record = SignedRecord.from_bytes(raw)
    message = domain.value + b"\x97" + raw[1:-66]
    return record.publisher.raw, message, record.signature


_CHUNK = 50


def _bench_kind(kind: str, count: int, rounds: int, publishers: int) -> dict[str, Any]:
    records = _records(kind, count, publishers)
    parts = [_signed_parts(raw, kind) for raw in records]
    joined = [(signature + message, key) for key, message, signature in parts]
    verify_key = nacl.signing.VerifyKey
    sign_open = nacl.bindings.crypto_sign_open
    clock = time.perf_counter

    def run_decoder(lo: int, hi: int) -> float:
        batch = records[lo:hi]
        start = clock()
        for raw in batch:
            decode_record(raw, NOW)
        return clock() - start

    def run_verify_key(lo: int, hi: int) -> float:
        batch = parts[lo:hi]
        start = clock()
        for key, message, signature in batch:
            verify_key(key).verify(message, signature)
        return clock() - start

    def run_sign_open(lo: int, hi: int) -> float:
        batch = joined[lo:hi]
        start = clock()
        for signed, key in batch:
            sign_open(signed, key)
        return clock() - start

    loops = [
        ("decode_record", run_decoder),
        ("verify_key", run_verify_key),
        ("crypto_sign_open", run_sign_open),
    ]
    for raw in records:  # warm up, and check that every record is accepted
        decode_record(raw, NOW)
    rates: dict[str, list[float]] = {name: [] for name, _ in loops}
    turn = 0
    for _ in range(rounds):
        # Interleave in small chunks, rotating the order, so that a burst of load from
        # elsewhere on the machine lands on all three measurements alike.
        totals = dict.fromkeys(rates, 0.0)
        gc.collect()
        gc.disable()
        try:
            for lo in range(0, len(records), _CHUNK):
                turn += 1
                for name, loop in loops[turn % 3 :] + loops[: turn % 3]:
                    totals[name] += loop(lo, lo + _CHUNK)
        finally:
            gc.enable()
        for name, total in totals.items():
            rates[name].append(len(records) / total)
    ratio_vk = [d / v for d, v in zip(rates["decode_record"], rates["verify_key"], strict=True)]
    ratio_so = [
        d / s for d, s in zip(rates["decode_record"], rates["crypto_sign_open"], strict=True)
    ]
    return {
        "records": len(records),
        "publishers": publishers,
        "record_bytes_mean": round(statistics.mean(len(raw) for raw in records), 1),
        "decode_record_per_s": round(statistics.median(rates["decode_record"])),
        "verify_key_verify_per_s": round(statistics.median(rates["verify_key"])),
        "crypto_sign_open_per_s": round(statistics.median(rates["crypto_sign_open"])),
        "decode_record_us": round(1e6 / statistics.median(rates["decode_record"]), 2),
        "verify_key_verify_us": round(1e6 / statistics.median(rates["verify_key"]), 2),
        "crypto_sign_open_us": round(1e6 / statistics.median(rates["crypto_sign_open"]), 2),
        "ratio_vs_verify_key": round(statistics.median(ratio_vk), 4),
        "ratio_vs_crypto_sign_open": round(statistics.median(ratio_so), 4),
        "ratio_vs_verify_key_min_max": [round(min(ratio_vk), 4), round(max(ratio_vk), 4)],
    }


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_trust_list(repeats: int) -> dict[str, Any]:
    maintainers = [make_identity(f"bench-maintainer-{i}", Role.MAINTAINER) for i in range(3)]
    entries = [TrustEntry(m.public_key, Role.MAINTAINER, "maintainers") for m in maintainers]
    for i in range(197):
        role = Role.DISPATCHER if i % 50 == 0 else Role.NODE
        identity = make_identity(f"bench-entry-{i}", role)
        entries.append(
            TrustEntry(
                identity.public_key,
                role,
                f"operator-{i % 40}",
                pools=("fedora",) if i % 7 == 0 else (),
                arches=("x86_64",) if i % 5 == 0 else (),
            )
        )
    draft = TrustList(1, NOW + 365 * 86400, 2, tuple(sorted(entries, key=lambda e: e.key)))
    current = draft
    for maintainer in maintainers:
        current = current.sign(maintainer)
    successor = current.next_version()
    for maintainer in maintainers:
        successor = successor.sign(maintainer)
    data = current.to_bytes()

    def parse_and_verify() -> None:
        TrustList.from_bytes(data).verify(NOW)

    parse_and_verify()
    return {
        "entries": len(entries),
        "maintainers": len(maintainers),
        "threshold": current.threshold,
        "signatures": len(current.signatures),
        "bytes": len(data),
        "from_bytes_ms": round(
            _median_seconds(lambda: TrustList.from_bytes(data), repeats) * 1e3, 3
        ),
        "verify_ms": round(_median_seconds(lambda: current.verify(NOW), repeats) * 1e3, 3),
        "from_bytes_and_verify_ms": round(_median_seconds(parse_and_verify, repeats) * 1e3, 3),
        "verify_successor_ms": round(
            _median_seconds(lambda: current.verify_successor(successor, NOW), repeats) * 1e3, 3
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--short", action="store_true", help="quick CI mode (about 2 s)")
    parser.add_argument("--rounds", type=int, help="timed rounds per measurement")
    parser.add_argument("--records", type=int, help="distinct records per batch")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.short else 15)
    count = args.records or (1000 if args.short else 4000)
    started = time.perf_counter()
    capability = _bench_kind("capability", count, rounds, publishers=64)
    status = _bench_kind("status", count, rounds, publishers=64)
    trust = _bench_trust_list(repeats=5 if args.short else 25)
    ratio = capability["ratio_vs_verify_key"]
    report = {
        "benchmark": "records",
        "mode": "short" if args.short else "long",
        "rounds": rounds,
        "goal_ratio": GOAL,
        # Headline: capability records, the larger kind and so the worst case.
        "records_per_s": capability["decode_record_per_s"],
        "raw_verify_key_per_s": capability["verify_key_verify_per_s"],
        "raw_crypto_sign_open_per_s": capability["crypto_sign_open_per_s"],
        "ratio": ratio,
        "ratio_vs_crypto_sign_open": capability["ratio_vs_crypto_sign_open"],
        "goal_met": ratio >= GOAL,
        "capability": capability,
        "status": status,
        "trust_list": trust,
        "seconds": round(time.perf_counter() - started, 2),
        "versions": {
            "python": platform.python_version(),
            "p2pbuild": p2pbuild.__version__,
            "pynacl": nacl.__version__,
        },
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
