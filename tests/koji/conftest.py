import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from koji_farms import Farms, open_farms

from p2pbuild.testing import hello_srpm


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The SRPM and the noarch RPM it builds (what the nodes return, bit for bit).
    Needs ``rpmbuild``."""
    tmp = tmp_path_factory.mktemp("packages")
    srpm = hello_srpm(tmp / "src", noarch=True)
    top = tmp / "top"
    subprocess.run(["rpmbuild", "--rebuild", "--nodeps", "--define", f"_topdir {top}",
                    str(srpm.path)], check=True, capture_output=True)
    return srpm.path, next((top / "RPMS").rglob("*.rpm")).read_bytes()


@pytest.fixture
async def farms(tmp_path: Path) -> AsyncIterator[Farms]:
    """Start a Koji farm with ``await farms.start(runners, ...)``; stopped at the end."""
    async with open_farms(tmp_path) as holder:
        yield holder
