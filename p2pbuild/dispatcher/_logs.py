"""Build logs kept by the dispatcher: where each attempt's signed logs are stored, and the
failure summary that quotes the failing step's last lines.

The engine downloads every result's logs through the node client (push and pull nodes
alike) into ``<state_dir>/logs/<build id>/<attempt id>/``, which outlives the build's work
directory: a failed build's logs are what its packager needs. ``p2pbuild builds logs`` and
``builds download`` read them through the API (``_api.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from .._errors import LocalError
from ..https import CertificatePinError, pinned_client
from ._db import AttemptRow, AttemptState

__all__ = [
    "TAIL_LINES", "attempt_logs", "failure_tails", "from_node", "log_dir", "tail_lines",
]

#: Lines of a failing log quoted in the failure summary.
TAIL_LINES = 25
#: Bytes read from a log's end to find those lines.
_TAIL_BYTES = 64 * 1024
#: Logs quoted per failure summary (one per operator).
_MAX_QUOTED = 3


async def from_node(tls_sha256: bytes, endpoint: str, path: str) -> AsyncIterator[bytes]:
    """Stream ``path`` (a running job's log) from its push node at ``endpoint``, pinned to
    its certificate, for the API and the web view alike. A failure ends the stream with a
    line saying so, in brackets, as the log's other notes are."""
    try:
        async with (
            pinned_client(tls_sha256, base_url=endpoint) as client,
            # No read timeout: a followed log is quiet while the build is.
            client.stream("GET", path, timeout=httpx.Timeout(30.0, read=None)) as response,
        ):
            if response.status_code != 200:
                yield f"\n[the node answered HTTP {response.status_code}]\n".encode()
                return
            async for chunk in response.aiter_bytes():
                yield chunk
    except (httpx.HTTPError, CertificatePinError, LocalError) as exc:
        yield f"\n[the node cannot be reached: {exc.__class__.__name__}]\n".encode()


def log_dir(state_dir: Path, build_id: str, attempt_id: int) -> Path:
    """Where attempt ``attempt_id``'s logs are kept."""
    return state_dir / "logs" / build_id / str(attempt_id)


def attempt_logs(state_dir: Path, build_id: str, attempt_id: int) -> list[Path]:
    """The attempt's stored log files, ``build.log`` first."""
    directory = log_dir(state_dir, build_id, attempt_id)
    if not directory.is_dir():
        return []
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.name != "build.log", str(p)))


def tail_lines(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of ``path`` (decoded leniently; empty if unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return text.rstrip("\n").split("\n")[-lines:] if text.strip() else []


def failure_tails(state_dir: Path, build_id: str, attempts: Sequence[AttemptRow]) -> str:
    """The failure summary's log section: for each operator whose attempt failed (at most
    three), the attempt's reason and the last lines of its main log. Empty when no failed
    attempt left a log or a reason."""
    sections: list[str] = []
    seen: set[str] = set()
    for attempt in attempts:
        if attempt.state is not AttemptState.FAILED or attempt.operator in seen:
            continue
        seen.add(attempt.operator)
        logs = attempt_logs(state_dir, build_id, attempt.id)
        head = (f"--- {attempt.operator} (node {attempt.node[8:24]}…, attempt {attempt.id}): "
                f"{attempt.reason or 'failed'}")
        if not logs:
            sections.append(head + "\n(no log from the node)")
        else:
            quoted = tail_lines(logs[0])
            sections.append(
                f"{head}\n    last {len(quoted)} lines of {logs[0].name}:\n"
                + "\n".join(f"    | {line}" for line in quoted)
            )
        if len(sections) >= _MAX_QUOTED:
            break
    return "\n".join(sections)
