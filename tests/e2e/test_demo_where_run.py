"""``p2pbuild demo`` run as a user runs it: the installed command, from wherever they are,
including the folder that holds their clone of the project (whose ``dispatcher/`` and
``node/`` folders must not shadow the package in the demo's child processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_from_the_folder_holding_the_clone(tmp_path: Path) -> None:
    clone = tmp_path / "p2pbuild"
    for folder in ("dispatcher", "node", "keys", "p2pbuild"):
        (clone / folder).mkdir(parents=True)
        (clone / folder / "README.md").write_text("a folder of the clone\n")
    command = Path(sys.executable).with_name("p2pbuild")
    done = subprocess.run([str(command), "demo"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert "ModuleNotFoundError" not in done.stderr
    assert "verified by two operators" in done.stdout
