"""``p2pbuild keys``: create and inspect identities."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._errors import KeyFileError
from .._identity import Identity, Role, load_public_key

__all__ = ["register"]


def register(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="create and inspect ed25519 identities",
        description="Create and inspect the ed25519 identities of nodes, dispatchers and "
        "maintainers.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    generate = keys_sub.add_parser(
        "generate",
        help="create a new key pair",
        description="Create a private key file (mode 0600, never overwritten) and a public "
        "key file PATH.pub next to it.",
    )
    generate.add_argument("--role", required=True, choices=[r.value for r in Role])
    generate.add_argument("--out", required=True, type=Path, metavar="PATH")
    generate.add_argument("--json", action="store_true", help="machine-readable output")
    generate.set_defaults(func=_generate)

    show = keys_sub.add_parser(
        "show",
        help="print a key's public form and fingerprint",
        description="Print the public key, fingerprint and role of a private key file, a "
        ".pub file or an ed25519:... key. Never prints a secret.",
    )
    show.add_argument("key", metavar="PATH_OR_KEY")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_show)


def _generate(args: argparse.Namespace) -> int:
    identity = Identity.generate(Role(args.role))
    folder: Path = args.out.expanduser().parent
    if not folder.is_dir():
        # A new folder for keys (~/.p2pbuild): readable by its owner only.
        try:
            folder.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise KeyFileError(f"cannot create {folder}: {exc.strerror}") from None
    pub_path = identity.save(args.out.expanduser())
    key = identity.public_key
    if args.json:
        print(json.dumps({
            "public_key": str(key), "fingerprint": key.fingerprint, "role": args.role,
            "private_key_file": str(args.out), "public_key_file": str(pub_path),
        }))
    else:
        print(f"created {args.role} key {key.fingerprint}")
        print(f"  public key:  {key}")
        print(f"  private key: {args.out} (mode 0600; keep it secret)")
        print(f"  public file: {pub_path} (share this one)")
    return 0


def _show(args: argparse.Namespace) -> int:
    text: str = args.key
    role: str | None = None
    if not text.startswith("ed25519:") and not text.endswith(".pub"):
        identity = Identity.load(Path(text))
        key = identity.public_key
        role = identity.role.value
    else:
        key = load_public_key(text)
        if text.endswith(".pub"):
            fields = Path(text).read_text(encoding="utf-8").split()
            role = fields[1] if len(fields) > 1 and fields[1] in set(Role) else None
    if args.json:
        print(json.dumps({"public_key": str(key), "fingerprint": key.fingerprint, "role": role}))
    else:
        print(f"public key:  {key}")
        print(f"fingerprint: {key.fingerprint}")
        if role:
            print(f"role:        {role}")
    return 0
