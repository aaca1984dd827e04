"""The one ``HOST:PORT`` parser: configuration files (node, dispatcher) and the command line
take addresses through it, so all refuse the same things (a port outside 1..65535, or
0..65535 where binding to any free port is allowed; an IPv6 address without brackets)."""

from __future__ import annotations

import ipaddress

__all__ = ["parse_host_port"]


def parse_host_port(
    text: str, *, allow_zero: bool = False, example: str = ""
) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``. Raises :class:`ValueError` with a short
    message (naming ``example``, a valid address, when given); callers add where the text
    came from and raise their own error."""
    hint = f" (for example {example})" if example else ""
    problem = f"expected HOST:PORT{hint}, got {text!r:.80}"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(problem)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r:.60} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(problem)
    if not host or not port.isascii() or not port.isdigit():
        raise ValueError(problem)
    number = int(port)
    lowest = 0 if allow_zero else 1
    if not lowest <= number <= 65535:
        raise ValueError(f"port {number} is not in {lowest}..65535")
    return host, number
