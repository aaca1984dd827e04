"""Test inputs for buildroots: :func:`greet_srpm`, which builds only where
``p2pbuild-greet-devel`` (:func:`~p2pbuild.testing.greet_devel_rpm`) is installed. The
repository helpers themselves live with the demo (``_cli/_repos.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._cli._packages import SourcePackage, write_srpm

__all__ = ["greet_srpm"]


_GREET_C = (
    "#include <stdio.h>\n#include <p2pbuild-greet.h>\n"
    "int main(void) { puts(GREETING); return 0; }\n"
)


def greet_srpm(
    dest_dir: Path, *, build_requires: Sequence[str] = ("gcc", "p2pbuild-greet-devel")
) -> SourcePackage:
    """``greet``: a C program that includes :data:`GREET_HEADER`, so it builds only where
    ``p2pbuild-greet-devel`` is installed. ``BuildRequires: gcc`` is met by the host base."""
    return write_srpm(
        dest_dir,
        name="greet",
        sources={"greet.c": _GREET_C},
        build="%{__cc} %{optflags} -o greet greet.c\n./greet",
        install="install -D -m 0755 greet %{buildroot}/usr/bin/greet",
        files=["/usr/bin/greet"],
        build_requires=build_requires,
    )
