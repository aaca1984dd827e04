"""The ``[koji]`` section of the dispatcher's configuration file: the dispatcher as a Koji
build host. The dispatcher's own loader hands the table over unread; the wiring
(``p2pbuild._wiring``) validates it here. Every error is one line naming the key
(:class:`~p2pbuild.dispatcher.ConfigError`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..dispatcher import ConfigError
from ..dispatcher._config import table_value as _get

__all__ = ["KojiConfig", "koji_config"]


@attrs.frozen
class KojiConfig:
    """The optional ``[koji]`` section: the dispatcher as a Koji build host (p2pbuild.koji).

    Secrets are never inline: ``password_file`` holds the host's password, ``cert`` a PEM
    file with the client certificate and key.
    """

    server: str
    topurl: str
    host: str
    authtype: str = "password"
    password_file: Path | None = None
    cert: Path | None = None
    serverca: Path | None = None
    channel: str = "p2p"
    content_generator: str = "p2p-build"
    #: "target": the build target's destination tag; "": do not tag; else a tag name.
    dest_tag: str = "target"
    arch: str | None = None
    os: str | None = None
    replicas: int = 2
    time_limit_s: int = 3600
    poll_interval_s: float = 5.0
    max_jobs: int = 10
    retry_interval_s: float = 5.0
    max_retries: int = 30
    min_space_mb: int = 1024


def koji_config(table: Mapping[str, Any], where: str,
                rel: Callable[[str], Path]) -> KojiConfig | None:
    """Validate the ``[koji]`` table (``where`` names it in errors, ``rel`` resolves a
    path relative to the file); None for an empty table. Raises :class:`ConfigError`."""
    if not table:
        return None
    w = where
    known = set(attrs.fields_dict(KojiConfig))
    for key in table:
        if key not in known:
            raise ConfigError(f"{w}: unknown key {key}")
    authtype = _get(table, "authtype", str, w, "password")
    if authtype not in ("password", "ssl"):
        raise ConfigError(f"{w}: authtype must be password or ssl")
    optional: dict[str, Path | None] = {
        key: rel(_get(table, key, str, w)) if key in table else None
        for key in ("password_file", "cert", "serverca")
    }
    if authtype == "password" and optional["password_file"] is None:
        raise ConfigError(f"{w}: authtype password needs password_file")
    if authtype == "ssl" and optional["cert"] is None:
        raise ConfigError(f"{w}: authtype ssl needs cert")
    server = _get(table, "server", str, w)
    if not server.startswith(("http://", "https://")):
        raise ConfigError(f"{w}: server must be an http:// or https:// URL")
    numbers: dict[str, Any] = {}
    for key in ("replicas", "time_limit_s", "max_jobs", "max_retries", "min_space_mb"):
        if key in table:
            numbers[key] = _get(table, key, int, w)
    for key in ("poll_interval_s", "retry_interval_s"):
        if key in table:
            numbers[key] = _get(table, key, float, w)
    if any(v < 0 for v in numbers.values()):
        raise ConfigError(f"{w}: numbers must not be negative")
    return KojiConfig(
        server=server.rstrip("/"),
        topurl=_get(table, "topurl", str, w).rstrip("/"),
        host=_get(table, "host", str, w),
        authtype=authtype,
        channel=_get(table, "channel", str, w, "p2p"),
        content_generator=_get(table, "content_generator", str, w, "p2p-build"),
        dest_tag=_get(table, "dest_tag", str, w, "target"),
        arch=_get(table, "arch", str, w, "") or None,
        os=_get(table, "os", str, w, "") or None,
        password_file=optional["password_file"],
        cert=optional["cert"],
        serverca=optional["serverca"],
        **numbers,
    )
