"""What the subcommands declare and print alike: a command with ACTIONs, an action that
calls its function, ``--json``, the dispatcher client's options, and a result printed as
one JSON line or as text.

What ``--help`` says of a command or an action beyond its one-line help is the docstring of
the function that adds its actions or carries it out (as in click), so a handler's docstring
is written for the command's users.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["action", "client_args", "command", "elapsed", "emit", "json_flag"]

Handler = Callable[[argparse.Namespace], int]


def command(sub: Any, name: str, add_actions: Callable[[Any], None], *, help: str,
            epilog: str | None = None) -> None:
    """Add the command ``name``, whose ACTION (``args.<name>_command``) is required, and
    call ``add_actions`` with the subparsers to add them to; its docstring is the command's
    ``--help`` description."""
    parser = sub.add_parser(name, help=help, description=inspect.getdoc(add_actions),
                            epilog=epilog)
    add_actions(parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True))


def action(sub: Any, name: str, func: Handler, *, help: str) -> argparse.ArgumentParser:
    """Add the parser ``name`` that runs ``func(args)`` (its exit status); returns it for
    its arguments. ``func``'s docstring, if it has one, is the ``--help`` description (as
    in click): a handler's docstring is written for the command's users."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=inspect.getdoc(func))
    parser.set_defaults(func=func)
    return parser


def json_flag(parser: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def client_args(parser: argparse.ArgumentParser) -> None:
    """The options that find a dispatcher (``_client.client_from_args``), and ``--json``."""
    parser.add_argument("--client-config", type=Path, metavar="FILE")
    parser.add_argument("--url", help="dispatcher URL, https://host:port")
    parser.add_argument("--pin", help="SHA-256 (hex) of the dispatcher's TLS certificate")
    parser.add_argument("--token", help="API token (default: $P2PBUILD_TOKEN or the file)")
    json_flag(parser)


def emit(args: argparse.Namespace, body: Any, text: str | Callable[[Any], object], *,
         indent: int | None = None, sort_keys: bool = False) -> int:
    """Print ``body`` as JSON with ``--json`` (one line unless ``indent``), else ``text``
    (a line, or a function that prints ``body``); exit status 0."""
    if args.json:
        print(json.dumps(body, indent=indent, sort_keys=sort_keys))
    elif isinstance(text, str):
        print(text)
    else:
        text(body)
    return 0


def elapsed(seconds: float, *, coarse: bool = False) -> str:
    """A duration as ``42s``, ``3m07s`` or ``2h05m``; ``coarse``, in one unit from twice
    that unit on: ``42s``, ``3m`` or ``2h``."""
    seconds = max(0, int(seconds))
    if coarse:
        size, unit = (3600, "h") if seconds >= 7200 else (60, "m") if seconds >= 120 else (1, "s")
        return f"{seconds // size}{unit}"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
