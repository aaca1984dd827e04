"""Test inputs for buildroots: :func:`greet_srpm`, which builds only where
``p2pbuild-greet-devel`` (:func:`~p2pbuild.testing.greet_devel_rpm`) is installed. The
repository helpers themselves live with the demo (``_cli/_repos.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._cli._packages import GREET_C, SourcePackage, c_program_srpm

__all__ = ["greet_srpm"]


def greet_srpm(
    dest_dir: Path, *, build_requires: Sequence[str] = ("gcc", "p2pbuild-greet-devel")
) -> SourcePackage:
    """``greet``: a C program that includes :data:`GREET_HEADER`, so it builds only where
    ``p2pbuild-greet-devel`` is installed. ``BuildRequires: gcc`` is met by the host base."""
    return c_program_srpm(dest_dir, "greet", GREET_C, build_requires=build_requires)
