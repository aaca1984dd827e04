"""Startup failures of the long-running commands as one line that names the fix.

A daemon binds its ports inside a nursery, so an address in use arrives as a bare
``OSError`` in an exception group, without the address. :func:`explain_bind_failure`
finds which configured address is taken by trying each again.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .._errors import LocalError

__all__ = ["StartupError", "explain_bind_failure", "Listen"]

#: ``(what, "tcp" or "udp", host, port)`` as the configuration names it.
Listen = tuple[str, str, str, int]


class StartupError(LocalError):
    """A daemon could not start: an address in use, a directory it may not write."""

    code = "startup"


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _taken(kind: str, host: str, port: int) -> bool:
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, sock_type) as probe:
        if kind == "tcp":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


@contextmanager
def explain_bind_failure(config: object, listens: Sequence[Listen]) -> Iterator[None]:
    """Turn an "address in use" from the block (bare or in a group) into a
    :class:`StartupError` naming the configured addresses that are taken."""
    try:
        yield
    except (OSError, BaseExceptionGroup) as exc:
        in_use = [e for e in _leaves(exc)
                  if isinstance(e, OSError) and e.errno == errno.EADDRINUSE]
        if not in_use:
            raise
        taken = [f"{what} {host}:{port}/{kind}" for what, kind, host, port in listens
                 if _taken(kind, host, port)]
        where = ", ".join(taken) if taken else " or ".join(
            f"{what} {host}:{port}/{kind}" for what, kind, host, port in listens)
        raise StartupError(
            f"address already in use: {where} (another process listens there; change it "
            f"in {config} or stop that process)"
        ) from None
