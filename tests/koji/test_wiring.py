"""The roles of a dispatcher machine wired together (``p2pbuild._wiring``): one
dispatcher per state directory, refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import trio
from waits import ready_line

from p2pbuild._wiring import lock_state_dir
from p2pbuild.dispatcher import ConfigError
from p2pbuild.https import generate_tls_material
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list(nodes=[("n1", "alice")], label="wiring-")


def test_a_state_directory_has_one_dispatcher(tmp_path: Path) -> None:
    with (
        lock_state_dir(tmp_path / "state"),
        pytest.raises(ConfigError, match=r"state is in use by another dispatcher \(pid "),
        lock_state_dir(tmp_path / "state"),
    ):
        pass
    with lock_state_dir(tmp_path / "state"):  # released with the first
        pass


@pytest.mark.slow
async def test_a_second_dispatcher_on_the_same_config_stops_with_one_line(
    tmp_path: Path,
) -> None:
    FIXTURE.dispatchers["dispatcher-1"].save(tmp_path / "dispatcher.key")
    (tmp_path / "trust-list.bin").write_bytes(FIXTURE.trust_list.to_bytes())
    (tmp_path / "tls").mkdir()
    generate_tls_material(tmp_path / "tls")
    config = tmp_path / "dispatcher.toml"
    # Port 0 for both listeners: only the state directory is shared.
    config.write_text(tomli_w.dumps({
        "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin"},
        "api": {"port": 0}, "dht": {"host": "127.0.0.1", "port": 0},
    }))
    argv = [sys.executable, "-m", "p2pbuild", "dispatcher", "run", "--config", str(config)]
    async with trio.open_nursery() as nursery:
        first = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                 stderr=subprocess.DEVNULL)
        try:
            assert (await ready_line(first, "the first dispatcher"))["port"] > 0
            with trio.fail_after(60):
                second = await trio.run_process(argv, capture_stdout=True,
                                                capture_stderr=True, check=False)
        finally:
            first.terminate()
            with trio.fail_after(30):
                await first.wait()
            await first.stdout.aclose()  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    assert second.returncode == 1
    assert second.stderr.decode().splitlines() == [
        f"p2pbuild: error: {tmp_path / 'state'} is in use by another dispatcher (pid "
        f"{first.pid}); stop it, or give this one its own state_dir"
    ]
