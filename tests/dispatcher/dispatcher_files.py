"""A dispatcher's directory for the tests that run one (``run_dispatcher``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from p2pbuild.https import generate_tls_material
from p2pbuild.testing import TrustFixture


def write_config(tmp: Path, fixture: TrustFixture, **sections: Any) -> Path:
    """Write ``fixture``'s dispatcher key, its trust list and a new TLS certificate into
    ``tmp``, and ``dispatcher.toml``: a ``[dispatcher]`` section naming them, an API on
    any free port, and ``sections`` (``api`` replacing that one). Returns its path."""
    fixture.dispatchers["dispatcher-1"].save(tmp / "dispatcher.key")
    (tmp / "trust-list.bin").write_bytes(fixture.trust_list.to_bytes())
    (tmp / "tls").mkdir()
    generate_tls_material(tmp / "tls")
    config = {
        "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin"},
        "api": {"port": 0},
        **sections,
    }
    path = tmp / "dispatcher.toml"
    path.write_text(tomli_w.dumps(config))
    return path
