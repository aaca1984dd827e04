"""The server's connection gate and upload budget: counts and decisions, with explicit time."""

from __future__ import annotations

import errno

from p2pbuild.https._server import ByteBudget, ConnectionGate, address_key


def test_address_key_groups_ipv6_by_slash_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == address_key("fe80::2")
    assert address_key("not-an-address") == "not-an-address"


def test_gate_bounds_total_and_per_address() -> None:
    gate = ConnectionGate(max_connections=3, max_per_address=2)
    assert gate.admit("a") and gate.admit("a")
    assert not gate.admit("a")
    assert gate.admit("b")
    assert not gate.admit("c")  # three open in all
    gate.release("a")
    assert gate.admit("c")
    stats = gate.statistics()
    assert (stats.open, stats.addresses, stats.accepted) == (3, 3, 4)
    assert dict(stats.refused) == {"max-connections": 1, "max-connections-per-address": 1}
    for key in ("a", "b", "c"):
        gate.release(key)
    assert gate.statistics().open == 0 and gate.statistics().addresses == 0


def test_accept_errors_are_logged_once_per_interval() -> None:
    gate = ConnectionGate(10, 10, log_interval=10.0)
    emfile = OSError(errno.EMFILE, "Too many open files")
    first = gate.accept_failed(emfile, 100.0)
    assert first is not None and "EMFILE" in first and "1 time" in first
    assert all(gate.accept_failed(emfile, 100.0 + i / 10) is None for i in range(1, 99))
    later = gate.accept_failed(emfile, 110.0)
    assert later is not None and "99 time(s)" in later
    # A connection aborted before accept is only counted.
    assert gate.accept_failed(OSError(errno.ECONNABORTED, "aborted"), 200.0) is None
    assert dict(gate.statistics().accept_errors) == {"ECONNABORTED": 1, "EMFILE": 100}


def test_byte_budget() -> None:
    budget = ByteBudget(100)
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1)
    budget.give(40)
    assert budget.take(30) and budget.used == 90 and budget.refused == 1
