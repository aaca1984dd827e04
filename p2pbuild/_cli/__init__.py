"""The ``p2pbuild`` command line: a thin layer that parses arguments, builds frozen values
and calls into the package (hypercorn ``__main__.py``).

Every subcommand module exposes ``register(subparsers)``, which adds its parsers and sets
``func`` to a callable ``(argparse.Namespace) -> int``. Errors from p2pbuild become one line
on stderr and exit status 1; usage errors exit 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._errors import P2PBuildError
from . import _builds, _demo, _dht, _dispatcher, _keys, _lease, _node, _trust

__all__ = ["main"]

_MODULES = (_keys, _trust, _dht, _node, _demo, _dispatcher, _builds, _lease)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pbuild",
        description=(
            "A volunteer build farm without a central directory: nodes publish signed records "
            "in a DHT, a dispatcher sends signed jobs to trusted nodes of different operators "
            "and stores a build only when their outputs are bit-for-bit identical."
        ),
        epilog="Run 'p2pbuild COMMAND --help' for the options of a command.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"p2pbuild {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone early is handled below
    except P2PBuildError as exc:
        print(f"p2pbuild: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("p2pbuild: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`p2pbuild ... --json | head`): stop quietly, as cat does.
        # Python would print an error while flushing stdout at exit; point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except BaseExceptionGroup as group:
        # A daemon's start fails inside its nursery (trust list, key, port in use): the
        # error arrives wrapped in a group. One line, as for any other error; anything
        # that is not an expected error stays a traceback (a bug must be seen).
        message = _expected(group)
        if message is None:
            raise
        print(f"p2pbuild: error: {message}", file=sys.stderr)
        return 1
    return status


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _expected(group: BaseExceptionGroup[BaseException]) -> str | None:
    """The one-line message for a group of only expected errors (ours, or the operating
    system's, such as an address in use), else None."""
    leaves = _leaves(group)
    if not leaves or not all(isinstance(e, (P2PBuildError, OSError)) for e in leaves):
        return None
    first = leaves[0]
    if isinstance(first, OSError) and not isinstance(first, P2PBuildError):
        text = str(first)
        return text if first.strerror is None or first.strerror in text else (
            f"{text}: {first.strerror}")
    return str(first)
