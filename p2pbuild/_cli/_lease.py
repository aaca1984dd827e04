"""``p2pbuild lease``: hold slots on nodes of a kind for a while, list, extend and return them.

The dispatcher is found as for ``submit`` (``client.toml``, ``--url``/``--pin``/``--token``).
Builds run on a lease's nodes with ``p2pbuild submit --lease ID``.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from ..dispatcher._errors import ConfigError
from ._args import action, client_args, command, emit
from ._client import call

__all__ = ["parse_duration", "register"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd]?)")


def parse_duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``30m``, ``2h``, ``1d`` or ``1h30m``. Raises
    :class:`ConfigError`."""
    total, position = 0, 0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += int(match.group(1)) * _UNITS[match.group(2) or "s"]
        position = match.end()
    if position != len(text) or not text or total < 1:
        raise ConfigError(f"{text!r} is not a duration such as 90s, 30m, 2h, 1d or 1h30m")
    return total


def register(sub: Any) -> None:
    command(sub, "lease", _lease_actions, help="hold slots on nodes for a while (sessions)")


def _lease_actions(lsub: Any) -> None:
    """Hold slots on nodes of a kind for a while: builds submitted with --lease ID run only there,
    and other users' builds go elsewhere until the lease is returned or expires."""
    request = action(lsub, "request", _request, help="ask for COUNT slots on nodes of a kind")
    request.add_argument("--arch", required=True)
    request.add_argument("--os", help="OS release (default: whichever most nodes run)")
    request.add_argument("--machine", choices=["vm", "metal"])
    request.add_argument("--pool")
    request.add_argument("--build-type", choices=["rpm", "make"], default="rpm")
    request.add_argument("--count", type=int, required=True, metavar="N")
    request.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                         help="how long, e.g. 30m, 2h, 1d")
    mode = request.add_mutually_exclusive_group()
    mode.add_argument("--distinct-operators", dest="operators", action="store_const",
                      const="distinct", help="one node per operator (default; builds under "
                      "the lease can be verified)")
    mode.add_argument("--same-operator", dest="operators", action="store_const",
                      const="same", help="all nodes of one operator")
    client_args(request)
    request.set_defaults(operators="distinct")
    ls = action(lsub, "ls", _ls, help="your leases (an admin's: everyone's)")
    ls.add_argument("--active", action="store_true", help="only leases not ended")
    client_args(ls)
    extend = action(lsub, "extend", _extend, help="make a lease last longer")
    extend.add_argument("lease_id", metavar="ID")
    extend.add_argument("--by", required=True, metavar="DURATION", help="e.g. 1h")
    client_args(extend)
    done = action(lsub, "done", _done, help="return a lease: its slots are free at once")
    done.add_argument("lease_id", metavar="ID")
    client_args(done)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _left(seconds: float) -> str:
    seconds = int(seconds)
    if seconds <= 0:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _print_lease(lease: dict[str, Any]) -> None:
    platform = f"{lease['arch']}/{lease['os']}" + (
        f" {lease['machine']}" if lease["machine"] else ""
    ) + (f" pool {lease['pool']}" if lease["pool"] else "")
    print(f"lease {lease['id']}  {lease['state']}  {platform}  user {lease['user']}")
    print(f"  expires {_when(lease['expires_at'])} ({_left(lease['remaining_s'])} left)")
    for node in lease["nodes"]:
        print(f"  node {node['fingerprint']}  operator {node['operator']}")


def _request(args: argparse.Namespace) -> int:
    """Ask the dispatcher for --count slots, one per node, chosen by the usual selection. Prints the
    lease id, its nodes and its expiry."""
    body: dict[str, Any] = {
        "arch": args.arch, "count": args.count, "duration_s": parse_duration(args.duration),
        "build_type": args.build_type, "operators": args.operators,
    }
    for key in ("os", "machine", "pool"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    return emit(args, call(args, "POST", "/v1/leases", body=body), _print_lease)


def _ls(args: argparse.Namespace) -> int:
    path = "/v1/leases?active=1" if args.active else "/v1/leases"
    return emit(args, call(args, "GET", path), _print_leases)


def _print_leases(body: dict[str, Any]) -> None:
    print(f"{'LEASE':<17}  {'STATE':<7}  {'USER':<10}  {'PLATFORM':<18}  {'SLOTS':>5}  "
          f"{'LEFT':>7}  OPERATORS")
    for lease in body["leases"]:
        platform = f"{lease['arch']}/{lease['os']}"
        operators = ",".join(sorted({n["operator"] for n in lease["nodes"]}))
        print(f"{lease['id']:<17}  {lease['state']:<7}  {lease['user'][:10]:<10}  "
              f"{platform[:18]:<18}  {len(lease['nodes']):>5}  "
              f"{_left(lease['remaining_s']):>7}  {operators}")


def _extend(args: argparse.Namespace) -> int:
    lease = call(args, "POST", f"/v1/leases/{args.lease_id}/extend",
                 body={"by_s": parse_duration(args.by)})
    return emit(args, lease, f"lease {lease['id']} now expires {_when(lease['expires_at'])}")


def _done(args: argparse.Namespace) -> int:
    lease = call(args, "DELETE", f"/v1/leases/{args.lease_id}")
    return emit(args, lease, f"lease {lease['id']} returned")
