"""``p2pbuild dht serve`` and ``p2pbuild directory ls``: run a bootstrap node, read the directory.

``dht serve`` runs a plain DHT node (no identity, no records of its own) that others join
through; it holds and serves whatever signed records land on it, like every node.

``directory ls`` joins the DHT through ``--bootstrap`` nodes with a throwaway node, looks the
query's facets up (``arch=...``, ``os=...``, ``machine=...``, ``pool=...``; with no filter,
both ``machine`` facets, which every capability is published under) and prints each
publisher's latest capability and status.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from .._errors import LocalError, MalformedError, P2PBuildError
from .._hostport import parse_host_port
from .._records import MachineType
from .._trust import TrustList
from ..dht import DhtConfig, Directory, NodeEntry, Query, UdpTransport, open_directory_on
from ._args import action, command, elapsed, emit, json_flag
from ._trust import load_trust_list

__all__ = ["register"]

#: The port ``dht serve`` suggests in its help; any port works.
DEFAULT_PORT = 7420


class UnreachableError(P2PBuildError):
    """The DHT could not be joined or did not answer in time."""

    code = "unreachable"


@attrs.frozen
class HostPort:
    """A ``HOST:PORT`` argument: ``host`` is a name or an IP literal (IPv6 in brackets on the
    command line)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, option: str, allow_zero: bool = False) -> HostPort:
        """Parse ``HOST:PORT`` or ``[IPV6]:PORT``. Raises :class:`MalformedError` with a
        message naming ``option``."""
        example = "0.0.0.0:7420" if allow_zero else "192.0.2.1:7420"
        try:
            host, number = parse_host_port(text, allow_zero=allow_zero, example=example)
        except ValueError as exc:
            raise MalformedError(f"{option}: {exc}") from None
        return cls(host, number)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _format_address(address: tuple[str, int]) -> str:
    return str(HostPort(address[0], address[1]))


def register(sub: Any) -> None:
    command(sub, "dht", _dht_actions, help="run a DHT node")
    command(sub, "directory", _directory_actions, help="look nodes up in the DHT")


def _dht_actions(dht_sub: Any) -> None:
    """Run a node of the p2pbuild DHT (Kademlia, speaking the wire protocol of the PyPI 'kademlia'
    package plus p2pbuild's own RPCs)."""
    serve = action(dht_sub, "serve", _serve, help="run a plain bootstrap node until interrupted")
    serve.add_argument("--bind", required=True, metavar="HOST:PORT",
                       help=f"UDP address to listen on, e.g. 0.0.0.0:{DEFAULT_PORT}")
    serve.add_argument("--bootstrap", action="extend", nargs="+", default=[],
                       metavar="HOST:PORT", help="join an existing DHT through these nodes")
    json_flag(serve, "print the start line as JSON")
    serve.add_argument("--log-interval", type=float, default=300.0, metavar="SECONDS",
                       help="print a statistics line to stderr this often (default 300; "
                       "0 disables)")


def _directory_actions(directory_sub: Any) -> None:
    """Read the directory of build nodes from the DHT."""
    ls = action(directory_sub, "ls", _ls, help="list nodes with their capabilities and last status")
    ls.add_argument("--bootstrap", action="extend", nargs="+", required=True,
                    metavar="HOST:PORT", help="DHT nodes to join through (one or more)")
    ls.add_argument("--arch", help="only this architecture, e.g. x86_64, s390x")
    ls.add_argument("--os", help="only this OS release, e.g. fedora-41")
    ls.add_argument("--machine", choices=[m.value for m in MachineType],
                    help="only virtual machines or bare metal")
    ls.add_argument("--pool", help="only nodes in this pool")
    ls.add_argument("--trust", type=Path, metavar="FILE",
                    help="keep only node keys this signed trust list names")
    ls.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                    help="give up after this long (default 15)")
    ls.add_argument("--bind", default=None, metavar="HOST:PORT",
                    help="local UDP address (default: any port on all interfaces)")
    json_flag(ls)
    ls.add_argument("--verbose", "-v", action="store_true",
                    help="report the join and the lookups' DHT statistics on stderr")


# -- dht serve --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """Run a plain DHT node that others can bootstrap from. It stores and serves the signed records
    that land on it, like every node, but publishes none. Prints its address and node id once it
    listens; stops on Ctrl-C or SIGTERM."""
    bind = HostPort.parse(args.bind, option="--bind", allow_zero=True)
    bootstrap = [HostPort.parse(a, option="--bootstrap") for a in args.bootstrap]
    if args.log_interval < 0:
        raise MalformedError("--log-interval must not be negative")
    return trio.run(_run_serve, bind, bootstrap, args.json, args.log_interval)


@asynccontextmanager
async def _opened(bind: HostPort) -> AsyncIterator[Directory]:
    """A directory on ``bind``; a bind failure becomes one :class:`LocalError` line."""
    config = DhtConfig()
    try:
        transport = await UdpTransport.bind(
            bind.host, bind.port, max_size=config.max_incoming_datagram
        )
    except OSError as exc:
        raise LocalError(f"cannot bind UDP {bind}: {exc.strerror or exc}") from None
    async with open_directory_on(transport, config=config) as directory:
        yield directory


async def _resolve(addresses: Sequence[HostPort]) -> list[tuple[str, int]]:
    """IP literal addresses of ``addresses``, resolved before a directory opens so that a
    failure is one plain error rather than one inside the directory's nursery."""
    resolved = []
    for address in addresses:
        try:
            infos = await trio.socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            raise UnreachableError(f"cannot resolve --bootstrap {address}: {exc}") from None
        sockaddr = infos[0][4]
        resolved.append((str(sockaddr[0]), int(sockaddr[1])))
    return resolved


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} p2pbuild dht: {message}", file=sys.stderr, flush=True)


async def _run_serve(
    bind: HostPort, bootstrap: Sequence[HostPort], as_json: bool, log_interval: float
) -> int:
    addresses = await _resolve(bootstrap)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with _opened(bind) as directory:
            contacts = await directory.bootstrap(addresses) if addresses else 0
            address = _format_address(directory.address)
            if as_json:
                print(json.dumps({
                    "address": address, "host": directory.address[0],
                    "port": directory.address[1], "node_id": directory.node_id.hex(),
                    "contacts": contacts,
                }), flush=True)
            else:
                print(f"p2pbuild dht node {directory.node_id.hex()} listening on UDP "
                      f"{address}", flush=True)
            if bootstrap:
                _log(f"joined through {len(bootstrap)} bootstrap address(es): "
                     f"{contacts} contact(s)" if contacts else
                     "no bootstrap node answered; serving alone until others join")
            async with trio.open_nursery() as nursery:
                if log_interval > 0:
                    nursery.start_soon(_log_statistics, directory, log_interval)
                async for _ in signals:
                    _log("SIGTERM: stopping")
                    nursery.cancel_scope.cancel()
                    break
    return 0


async def _log_statistics(directory: Directory, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        s = directory.statistics()
        _log(f"contacts={s.contacts} records={s.records_held} requests_in={s.requests_in} "
             f"rpcs_sent={s.rpcs_sent} timed_out={s.rpcs_timed_out} "
             f"dropped={s.dropped_total} rejected={s.rejected_total}")


# -- directory ls -----------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    """Join the DHT through --bootstrap, look up the nodes matching every given filter and print
    their latest signed capability and status. Records are verified; with --trust only keys the
    trust list names as nodes are shown."""
    bootstrap = [HostPort.parse(a, option="--bootstrap") for a in args.bootstrap]
    if args.bind is not None:
        bind = HostPort.parse(args.bind, option="--bind", allow_zero=True)
    else:
        # Listen on the family of the first bootstrap address.
        first = bootstrap[0].host
        bind = HostPort("::" if ":" in first else "0.0.0.0", 0)
    query = Query(arch=args.arch, os=args.os, machine=args.machine, pool=args.pool)
    trust: TrustList | None = None
    if args.trust is not None:
        trust = load_trust_list(args.trust)
        try:
            trust.verify(time.time())
        except P2PBuildError as exc:
            raise type(exc)(f"{args.trust}: {exc}") from None
    if not args.timeout > 0:
        raise MalformedError("--timeout must be positive")
    entries, now = trio.run(_lookup, bind, bootstrap, query, trust, args.timeout, args.verbose)
    return emit(args, {
        "query": {"arch": args.arch, "os": args.os, "machine": args.machine,
                  "pool": args.pool, "trusted_only": trust is not None},
        "nodes": [_entry_json(e, now) for e in entries],
    }, lambda _: _print_table(entries, now), indent=2)


async def _lookup(
    bind: HostPort,
    bootstrap: Sequence[HostPort],
    query: Query,
    trust: TrustList | None,
    timeout: float,
    verbose: bool = False,
) -> tuple[list[NodeEntry], float]:
    # Every capability is indexed under its machine facet, so "no filter" is both of those.
    queries = [query] if query.facets() else [Query(machine=m) for m in MachineType]
    found: dict[bytes, NodeEntry] = {}
    joined = False
    now = 0.0
    with trio.move_on_after(timeout) as scope:
        addresses = await _resolve(bootstrap)
        # Nothing raises inside the block on purpose: an error there would reach the
        # user wrapped in the directory nursery's exception group.
        async with _opened(bind) as directory:
            contacts = await directory.bootstrap(addresses)
            joined = contacts > 0
            if verbose:
                _log(f"node {directory.node_id.hex()} on {_format_address(directory.address)} "
                     f"joined with {contacts} contact(s)")
            if joined:
                for each in queries:
                    entries = await directory.find(each, trust_list=trust)
                    if verbose:
                        _log(f"{' '.join(each.facets())}: {len(entries)} node(s)")
                    for entry in entries:
                        found.setdefault(entry.publisher.raw, entry)
            now = directory.now()
            if verbose:
                _log(f"statistics: {directory.statistics()}")
    if not joined and not scope.cancelled_caught:
        raise UnreachableError(
            "no --bootstrap node answered: " + ", ".join(str(b) for b in bootstrap)
        )
    if scope.cancelled_caught:
        raise UnreachableError(f"the directory lookup did not finish within {timeout:g}s")
    return [found[k] for k in sorted(found)], now


def _memory(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


def _entry_json(entry: NodeEntry, now: float) -> dict[str, Any]:
    cap = entry.capability
    status = entry.status
    record = entry.status_record
    result: dict[str, Any] = {
        "publisher": str(entry.publisher),
        "fingerprint": entry.publisher.fingerprint,
        "arch": cap.arch,
        "os": cap.os,
        "machine": cap.machine.value,
        "cpus": cap.cpus,
        "cpu_model": cap.cpu_model,
        "memory_mb": cap.memory_mb,
        "disk_mb": cap.disk_mb,
        "build_types": list(cap.build_types),
        "pools": list(cap.pools),
        "endpoint": cap.endpoint or None,
        "pull_only": cap.pull_only,
        "tls_sha256": cap.tls_sha256.hex() or None,
        "capability_seq": entry.capability_record.seq,
        "capability_expires_at": entry.capability_record.expires_at,
        "status": None,
    }
    if status is not None and record is not None:
        result["status"] = {
            "load": status.load_milli / 1000,
            "slots_free": status.slots_free,
            "slots_total": status.slots_total,
            "running": status.running,
            "uptime_s": status.uptime_s,
            "draining": status.draining,
            "seq": record.seq,
            "issued_at": record.issued_at,
            "expires_at": record.expires_at,
            "age_s": max(0, int(now - record.issued_at)),
        }
    if entry.trust is not None:
        result["operator"] = entry.trust.operator
    return result


_COLUMNS = ("PUBLISHER", "ARCH", "OS", "MACHINE", "CPUS", "MEMORY", "POOLS", "ENDPOINT",
            "SLOTS", "LOAD", "STATUS AGE")


def _row(entry: NodeEntry, now: float) -> tuple[str, ...]:
    cap = entry.capability
    status = entry.status
    record = entry.status_record
    if status is not None and record is not None:
        slots = f"{status.slots_free}/{status.slots_total}"
        if status.draining:
            slots += " draining"
        load = f"{status.load_milli / 1000:.2f}"
        age = elapsed(now - record.issued_at, coarse=True)
    else:
        slots = load = age = "-"
    return (
        entry.publisher.fingerprint, cap.arch, cap.os, cap.machine.value, str(cap.cpus),
        _memory(cap.memory_mb), ",".join(cap.pools) or "-", cap.endpoint or "pull",
        slots, load, age,
    )


def _print_table(entries: Sequence[NodeEntry], now: float) -> None:
    if not entries:
        print("no nodes found")
        return
    rows = [_COLUMNS, *(_row(e, now) for e in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print(f"{len(entries)} node(s)")
