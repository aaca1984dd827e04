"""``p2pbuild keys``: create and inspect identities."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .._errors import KeyFileError
from .._identity import Identity, Role, load_public_key
from ._args import action, command, emit, json_flag

__all__ = ["register"]


def register(sub: Any) -> None:
    command(sub, "keys", _keys_actions, help="create and inspect ed25519 identities")


def _keys_actions(keys_sub: Any) -> None:
    """Create and inspect the ed25519 identities of nodes, dispatchers and maintainers."""
    generate = action(keys_sub, "generate", _generate, help="create a new key pair")
    generate.add_argument("--role", required=True, choices=[r.value for r in Role])
    generate.add_argument("--out", required=True, type=Path, metavar="PATH")
    json_flag(generate)

    show = action(keys_sub, "show", _show, help="print a key's public form and fingerprint")
    show.add_argument("key", metavar="PATH_OR_KEY")
    json_flag(show)


def _generate(args: argparse.Namespace) -> int:
    """Create a private key file (mode 0600, never overwritten) and a public key file PATH.pub next
    to it."""
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
    return emit(args, {
        "public_key": str(key), "fingerprint": key.fingerprint, "role": args.role,
        "private_key_file": str(args.out), "public_key_file": str(pub_path),
    }, f"created {args.role} key {key.fingerprint}\n"
        f"  public key:  {key}\n"
        f"  private key: {args.out} (mode 0600; keep it secret)\n"
        f"  public file: {pub_path} (share this one)")


def _show(args: argparse.Namespace) -> int:
    """Print the public key, fingerprint and role of a private key file, a .pub file or an
    ed25519:... key. Never prints a secret."""
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
    return emit(args, {"public_key": str(key), "fingerprint": key.fingerprint, "role": role},
                f"public key:  {key}\nfingerprint: {key.fingerprint}"
                + (f"\nrole:        {role}" if role else ""))
