"""``p2pbuild trust``: the maintainers' tools for the signed trust list.

Editing rules, so that a published list is never changed under its signatures:

* Editing a list that is *valid* (signed by its threshold, so it may have been published)
  archives it next to the file as ``<name>.v<N><suffix>`` and starts the draft of version
  ``N+1``. Signing that draft then needs the old maintainers too (rotation), and ``sign``
  finds the archived version by itself.
* Editing a draft that is not yet valid changes it in place and drops the signatures
  collected so far, which no longer cover its content.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from .._errors import KeyFileError, LocalError, P2PBuildError
from .._identity import Identity, PublicKey, Role, load_public_key
from .._trust import TrustEntry, TrustList, read_trust_list
from ._args import Handler, action, command, emit, json_flag

__all__ = ["register"]

_DEFAULT_FILE = Path("trust-list.msgpack")
_DAY = 86_400


def register(sub: Any) -> None:
    command(sub, "trust", _trust_actions, help="create, edit, sign and verify the trust list",
            epilog="See keys/README.md for the maintainers' workflow (create, sign, rotate).")


def _trust_actions(trust_sub: Any) -> None:
    """Create, edit, sign and verify the trust list: the document, signed by a threshold of
    maintainers, that names the keys a deployment trusts."""

    def add(name: str, func: Handler, help: str) -> argparse.ArgumentParser:
        parser = action(trust_sub, name, func, help=help)
        parser.add_argument(
            "--file", "-f", type=Path, default=_DEFAULT_FILE,
            help=f"the trust list file (default: {_DEFAULT_FILE})",
        )
        return parser

    init = add("init", _init, "start version 1 with its maintainers")
    init.add_argument("--threshold", type=int, required=True, metavar="K",
                      help="signatures needed out of the maintainers")
    init.add_argument("--maintainer", action="append", required=True, metavar="KEY",
                      help="a maintainer's public key (ed25519:... or a .pub file); repeat")
    init.add_argument("--operator", default="maintainers",
                      help="operator name recorded for the maintainers (default: maintainers)")
    init.add_argument("--days", type=int, default=365, help="days until expiry (default 365)")

    add_cmd = add("add", _add, "trust a key (or change its entry)")
    add_cmd.add_argument("key", metavar="KEY", help="ed25519:... or a .pub or key file")
    add_cmd.add_argument("--role", required=True, choices=[r.value for r in Role])
    add_cmd.add_argument("--operator", required=True,
                         help="who runs it; one operator's nodes never verify each other")
    add_cmd.add_argument("--pool", action="append", default=[], metavar="P",
                         help="restrict the node to this pool; repeat")
    add_cmd.add_argument("--arch", action="append", default=[], metavar="A",
                         help="restrict the node to this architecture; repeat")
    add_cmd.add_argument("--force-role", action="store_true",
                         help="trust the key in --role although its key file, or its entry "
                         "already on the list, says it is another role")

    remove = add("remove", _remove, "revoke a key")
    remove.add_argument("key", metavar="KEY")

    set_cmd = add("set", _set, "change the threshold or the expiry")
    set_cmd.add_argument("--threshold", type=int, metavar="K")
    set_cmd.add_argument("--days", type=int, help="expire this many days from now")

    sign = add("sign", _sign, "add your maintainer signature")
    sign.add_argument("--key", required=True, type=Path, metavar="MAINTAINER_KEY")
    sign.add_argument("--previous", type=Path, metavar="OLD")

    verify = add("verify", _verify, "check the list; exit 0 only when valid")
    verify.add_argument("--previous", type=Path, metavar="OLD")
    json_flag(verify)

    show = add("show", _show, "print the list")
    json_flag(show)


# -- file handling ----------------------------------------------------------------------------


def load_trust_list(path: Path) -> TrustList:
    """Read and parse a trust list file (size-bounded). Raises P2PBuildError subclasses."""
    return read_trust_list(path)


def _write(path: Path, trust: TrustList) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(trust.to_bytes())
        os.replace(tmp, path)
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror}") from None


def _archive_path(path: Path, version: int) -> Path:
    return path.with_name(f"{path.stem}.v{version}{path.suffix}")


def _is_published(trust: TrustList) -> bool:
    """Signed by its threshold, so it may have been published (expired or not)."""
    return len(trust.valid_signers(trust.maintainers)) >= trust.threshold


def _edit(path: Path, change: Any) -> TrustList:
    """Apply ``change`` (TrustList -> TrustList) following the module's editing rules."""
    current = load_trust_list(path)
    if _is_published(current):
        archive = _archive_path(path, current.version)
        if not archive.exists():
            _write(archive, current)
            print(f"archived signed v{current.version} as {archive}")
        draft = current.next_version()
        print(f"editing draft v{draft.version}: it needs signatures from the v{current.version} "
              f"maintainers ({current.threshold} of {len(current.maintainers)}) and its own")
    else:
        draft = current
        if current.signatures:
            print(f"dropping {len(current.signatures)} signature(s) on the unfinished "
                  f"v{current.version}: they do not cover the change")
    new: TrustList = change(draft)
    _write(path, attrs.evolve(new, signatures=()))
    return new


def _expiry(days: int) -> int:
    if not 1 <= days <= 3650:
        raise LocalError("--days must be between 1 and 3650")
    return int(time.time()) + days * _DAY


# -- commands ---------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    """Write an unsigned version 1 naming the maintainers and the threshold of them that must sign
    every version."""
    path: Path = args.file
    if path.exists():
        raise LocalError(f"{path} already exists; edit it with add/remove/set instead")
    keys = sorted({load_public_key(text) for text in args.maintainer})
    entries = tuple(TrustEntry(key, Role.MAINTAINER, args.operator) for key in keys)
    trust = TrustList(1, _expiry(args.days), args.threshold, entries)
    _write(path, trust)
    print(f"wrote unsigned v1 to {path}: {len(keys)} maintainer{'s' if len(keys) != 1 else ''}, "
          f"threshold {args.threshold}")
    print(f"next: add keys with 'p2pbuild trust add', then {args.threshold} maintainers run "
          f"'p2pbuild trust sign --key MAINTAINER_KEY -f {path}'")
    return 0


def _declared_role(text: str) -> Role | None:
    """The role a key file declares (a ``.pub`` line's second word, a private key file's
    role), or None for ``ed25519:...`` text and files that declare none."""
    path = Path(text)
    if text.startswith("ed25519:") or not path.is_file():
        return None
    if path.suffix == ".pub":
        try:
            fields = path.read_text(encoding="utf-8")[:4096].split()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            return Role(fields[1]) if len(fields) > 1 else None
        except ValueError:
            return None
    return Identity.load(path).role


def _add(args: argparse.Namespace) -> int:
    """Add an entry for KEY, or replace the existing one."""
    key = load_public_key(args.key)
    role = Role(args.role)
    declared = _declared_role(args.key)
    current = load_trust_list(args.file).entry(key)
    if not args.force_role:
        if declared is not None and declared is not role:
            raise LocalError(
                f"{args.key} is a {declared.value} key, not a {role.value} key: trusting it as "
                f"a {role.value} would make it one (pass --force-role if that is meant)"
            )
        if current is not None and current.role is not role:
            raise LocalError(
                f"{key.fingerprint} is on the list as a {current.role.value} of "
                f"{current.operator}; adding it as a {role.value} would replace that entry "
                "(pass --force-role if that is meant)"
            )
    entry = TrustEntry(key, role, args.operator, sorted(set(args.pool)),
                       sorted(set(args.arch)))
    new = _edit(args.file, lambda t: t.with_entry(entry))
    print(f"v{new.version}: {key.fingerprint} trusted as {args.role} of {args.operator}; "
          f"now unsigned")
    return 0


def _remove(args: argparse.Namespace) -> int:
    """Remove KEY's entry: from this version on it is not trusted for anything."""
    key = load_public_key(args.key)
    new = _edit(args.file, lambda t: t.without_entry(key))
    print(f"v{new.version}: {key.fingerprint} removed (revoked); now unsigned")
    return 0


def _set(args: argparse.Namespace) -> int:
    """Change the threshold and/or renew the expiry."""
    if args.threshold is None and args.days is None:
        raise LocalError("nothing to change: give --threshold and/or --days")
    changes: dict[str, int] = {}
    if args.threshold is not None:
        changes["threshold"] = args.threshold
    if args.days is not None:
        changes["expires_at"] = _expiry(args.days)
    new = _edit(args.file, lambda t: attrs.evolve(t, **changes))
    print(f"v{new.version}: threshold {new.threshold}, expires {_date(new.expires_at)}; "
          f"now unsigned")
    return 0


def _sign(args: argparse.Namespace) -> int:
    """Sign the list with a maintainer's private key. For version N+1 the previous version's
    maintainers sign too; the archived previous version next to the file is used unless
    --previous names another."""
    path: Path = args.file
    trust = load_trust_list(path)
    identity = Identity.load(args.key)
    if identity.role is not Role.MAINTAINER:
        raise KeyFileError(f"{args.key} is a {identity.role.value} key, not a maintainer key")
    previous = _previous(path, trust, args.previous)
    key = identity.public_key
    allowed = set(trust.maintainers) | set(previous.maintainers if previous else ())
    if key not in allowed:
        raise LocalError(f"{key.fingerprint} is not a maintainer of this version or the previous")
    signed = trust.sign(identity)
    _write(path, signed)
    mine = len(signed.valid_signers(signed.maintainers))
    print(f"signed v{signed.version} as {key.fingerprint}: "
          f"{_signature_count(mine, signed.threshold, signed.version)}")
    if previous is not None:
        old = len(signed.valid_signers(previous.maintainers))
        print(f"  {_signature_count(old, previous.threshold, previous.version)}")
    return 0


def _signature_count(have: int, needed: int, version: int) -> str:
    state = "enough" if have >= needed else f"{needed - have} more needed"
    return (f"{have} valid v{version} maintainer signature{'s' if have != 1 else ''} of the "
            f"{needed} required ({state})")


def _previous(path: Path, trust: TrustList, given: Path | None) -> TrustList | None:
    if given is not None:
        return load_trust_list(given)
    archive = _archive_path(path, trust.version - 1)
    return load_trust_list(archive) if trust.version > 1 and archive.exists() else None


def _verify(args: argparse.Namespace) -> int:
    """Check that the list is signed by its threshold and not expired and, with --previous, that it
    is a valid successor (next version, signed by the old threshold). Exit 0 when valid, 1
    otherwise."""
    trust = load_trust_list(args.file)
    now = time.time()
    # Without --previous, the archived previous version next to the file (as ``sign``
    # finds it): a v2 signed by its own threshold but not by v1's is no valid rotation,
    # and nodes that trust v1 refuse it.
    previous = _previous(args.file, trust, args.previous)
    try:
        if previous is not None:
            previous.verify_successor(trust, now)
        else:
            trust.verify(now)
    except P2PBuildError as exc:
        reason = str(exc)
        if previous is not None:
            old = len(trust.valid_signers(previous.maintainers))
            reason += (f" ({old} of {previous.threshold} needed v{previous.version} maintainer "
                       f"signatures, {len(trust.valid_signers(trust.maintainers))} of "
                       f"{trust.threshold} needed v{trust.version} ones)")
        if args.json:
            print(json.dumps({"valid": False, "version": trust.version, "code": exc.code,
                              "reason": reason,
                              "previous": previous.version if previous else None}))
        else:
            print(f"p2pbuild: INVALID: {reason}", file=sys.stderr)
        return 1
    what = f"a valid successor of v{previous.version}" if previous is not None else "valid"

    def text(_: object) -> None:
        print(f"trust list v{trust.version} is {what}; expires {_date(trust.expires_at)}")
        if previous is None and trust.version > 1:
            print(f"note: not checked against v{trust.version - 1} (no "
                  f"{_archive_path(args.file, trust.version - 1).name} here; pass --previous): "
                  f"nodes that trust v{trust.version - 1} accept it only if that threshold "
                  "signed it too", file=sys.stderr)

    return emit(args, {"valid": True, "version": trust.version,
                       "previous": previous.version if previous else None}, text)


def _date(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _status(trust: TrustList) -> str:
    try:
        trust.verify(time.time())
    except P2PBuildError as exc:
        return f"{exc.code}: {exc}"
    return "valid"


def _show(args: argparse.Namespace) -> int:
    """Print the version, expiry, signatures and entries."""
    trust = load_trust_list(args.file)
    signers = trust.valid_signers(trust.maintainers)
    status = _status(trust)
    return emit(args, {
        "version": trust.version,
        "expires_at": trust.expires_at,
        "threshold": trust.threshold,
        "maintainers": len(trust.maintainers),
        "status": status,
        "signed_by": sorted(str(key) for key in signers),
        "entries": [_entry_json(entry) for entry in trust.entries],
    }, lambda _: _print_list(trust, signers, status), indent=2)


def _print_list(trust: TrustList, signers: set[PublicKey], status: str) -> None:
    print(f"trust list v{trust.version}  expires {_date(trust.expires_at)}  "
          f"threshold {trust.threshold} of {len(trust.maintainers)}  "
          f"signed by {len(signers)}  status: {status}")
    rows = [("FINGERPRINT", "ROLE", "OPERATOR", "POOLS", "ARCHES", "SIGNED", "KEY")]
    for entry in trust.entries:
        signed = "yes" if entry.key in signers else ("no" if entry.role is Role.MAINTAINER else "")
        rows.append((entry.key.fingerprint, entry.role.value, entry.operator,
                     ",".join(entry.pools) or "-", ",".join(entry.arches) or "-", signed,
                     str(entry.key)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _entry_json(entry: TrustEntry) -> dict[str, object]:
    return {"key": str(entry.key), "fingerprint": entry.key.fingerprint,
            "role": entry.role.value, "operator": entry.operator,
            "pools": list(entry.pools), "arches": list(entry.arches)}
