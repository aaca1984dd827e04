"""Fixtures shared by the end-to-end tests (farms of real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbuild.testing import hello_srpm


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SRPMs, generated once: a quick C hello and one whose %build sleeps 4 s."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "hello": hello_srpm(root / "hello").path,
        "slow": hello_srpm(root / "slow", build_seconds=4, release="2.slow").path,
    }
