"""What the deployment folders ship works as their READMEs say: the systemd units run the
program where the READMEs install it, pass ``systemd-analyze verify``, the dispatcher's is
hardened, their documentation links exist in the checkout, and the cloud-init recipe
installs from the checkout and copies a unit the checkout has."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UNITS = [ROOT / "node" / "p2pbuild-node.service",
         ROOT / "dispatcher" / "p2pbuild-dispatcher.service",
         ROOT / "dispatcher" / "p2pbuild-dht-seed.service"]
#: Where node/README.md, dispatcher/README.md and README.md install p2pbuild.
INSTALLED = "/opt/p2pbuild/bin/p2pbuild"
CHECKOUT = "/opt/p2pbuild/src"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="tools/install-system-packages installs systemd")


def lines(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines()
            if line.startswith(f"{key}=")]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_a_unit_runs_the_installed_program_and_its_docs_exist(unit: Path) -> None:
    for readme in ("README.md", "node/README.md", "dispatcher/README.md"):
        text = (ROOT / readme).read_text()
        assert f"/opt/p2pbuild/bin/pip install {CHECKOUT}" in text, readme
    (start,) = lines(unit, "ExecStart")
    assert start.startswith(INSTALLED + " "), start
    docs = [d for value in lines(unit, "Documentation") for d in value.split()]
    assert docs
    for link in docs:
        assert link.startswith(f"file://{CHECKOUT}/"), link
        assert (ROOT / link.removeprefix(f"file://{CHECKOUT}/")).is_file(), link


@needs_systemd
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_a_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # The program at the installed path, here: this checkout's.
    here = Path(sys.executable).with_name("p2pbuild")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED, str(here)))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@needs_systemd
@pytest.mark.parametrize(("unit", "limit"), [(UNITS[1], 4.0), (UNITS[2], 4.0)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_the_dispatcher_units_are_hardened(unit: Path, limit: float) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match is not None, done.stdout[-500:] + done.stderr
    assert float(match.group(1)) <= limit, done.stdout[-2000:]


def test_cloud_init_installs_from_the_checkout_and_copies_its_unit() -> None:
    text = (ROOT / "node" / "cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    # The setup script: the block under its write_files entry, up to runcmd.
    block = text.split("path: /usr/local/sbin/p2pbuild-node-setup", 1)[1]
    block = block.split("content: |\n", 1)[1].split("\nruncmd:", 1)[0]
    script = textwrap.dedent(block)
    assert script.startswith("#!/bin/sh\n")
    packages = text.split("\npackages:\n", 1)[1].split("\n#", 1)[0]
    assert "example.org" not in script
    assert "pip install p2pbuild" not in script  # not on PyPI
    assert f"/opt/p2pbuild/bin/pip install {CHECKOUT}" in script
    installed = re.findall(rf"{CHECKOUT}/(\S+\.service)", script)
    assert installed == ["node/p2pbuild-node.service"]
    assert all((ROOT / path).is_file() for path in installed)
    assert "  - git" in packages.splitlines()
    syntax = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True,
                            check=False)
    assert syntax.returncode == 0, syntax.stderr
