"""``p2pbuild dispatcher run`` and ``node run`` as systemd starts them: every startup error
is one line on stderr with exit status 1, never a traceback, and a misspelled key in
either configuration is refused by name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from p2pbuild.testing import LocalFarm, NodeSpec

pytestmark = pytest.mark.slow


@pytest.fixture
def farm(tmp_path: Path) -> LocalFarm:
    return LocalFarm.create(tmp_path / "farm", [NodeSpec("alice-1", "alice")])


def run(*argv: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pbuild", *map(str, argv)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    # Log lines of what went before may precede it (a node warns that no bootstrap node
    # answered before it binds its API port); the error itself is the last line, alone.
    lines = [line for line in done.stderr.strip().splitlines()
             if " p2pbuild." not in line or not line[:4].isdigit()]
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("p2pbuild: error: "), lines
    assert done.stderr.strip().splitlines()[-1] == lines[0]
    for word in words:
        assert word in lines[0], lines
    return lines[0]


def under_signed(farm: LocalFarm) -> bytes:
    """The farm's list signed by 1 of the 2 maintainers it needs."""
    return attrs.evolve(farm.trust_list, signatures=()).sign(farm.maintainers[0]).to_bytes()


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(("table", "key"), [("api", "prot"), ("dht", "bootstrapp"),
                                            ("dispatcher", "repositry")])
def test_dispatcher_config_refuses_a_misspelled_key(
    farm: LocalFarm, table: str, key: str
) -> None:
    replace_in(farm.dispatcher_config, f"[{table}]\n", f"[{table}]\n{key} = 1\n")
    one_line_error(run("dispatcher", "run", "--config", farm.dispatcher_config),
                   repr(key), f"[{table}]")


DISPATCHER_BREAKS: dict[str, tuple[Callable[[LocalFarm], object], tuple[str, ...]]] = {
    "missing trust list": (
        lambda f: (f.root / "dispatcher" / "trust-list.bin").unlink(), ("trust list",)),
    "under-signed trust list": (
        lambda f: (f.root / "dispatcher" / "trust-list.bin").write_bytes(under_signed(f)),
        ("trust list", "signature")),
    "corrupt key": (
        lambda f: (f.root / "dispatcher" / "dispatcher.key").write_bytes(b"garbage\n"),
        ("dispatcher.key",)),
}


@pytest.mark.parametrize("case", sorted(DISPATCHER_BREAKS))
def test_dispatcher_run_startup_errors_are_one_line(farm: LocalFarm, case: str) -> None:
    breaks, words = DISPATCHER_BREAKS[case]
    breaks(farm)
    one_line_error(run("dispatcher", "run", "--config", farm.dispatcher_config), *words)


def test_dispatcher_run_port_in_use_is_one_line(farm: LocalFarm) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", farm.dispatcher_port))
        taken.listen()
        one_line_error(run("dispatcher", "run", "--config", farm.dispatcher_config),
                       str(farm.dispatcher_port))


NODE_BREAKS: dict[str, tuple[Callable[[Path, LocalFarm], object], tuple[str, ...]]] = {
    "missing trust list": (lambda d, f: (d / "trust-list.bin").unlink(), ("trust list",)),
    "under-signed trust list": (
        lambda d, f: (d / "trust-list.bin").write_bytes(under_signed(f)),
        ("trust list", "signature")),
    "corrupt key": (lambda d, f: (d / "node.key").write_bytes(b"garbage\n"), ("node.key",)),
}


@pytest.mark.parametrize("case", sorted(NODE_BREAKS))
def test_node_run_startup_errors_are_one_line(farm: LocalFarm, case: str) -> None:
    directory = farm.root / "nodes" / "alice-1"
    breaks, words = NODE_BREAKS[case]
    breaks(directory, farm)
    one_line_error(run("node", "run", "--config", directory / "node.toml"), *words)


def test_node_run_port_in_use_is_one_line(farm: LocalFarm) -> None:
    directory = farm.root / "nodes" / "alice-1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        replace_in(directory / "node.toml", 'bind = "127.0.0.1:0"\n\n[limits]',
                   f'bind = "127.0.0.1:{port}"\n\n[limits]')
        one_line_error(run("node", "run", "--config", directory / "node.toml"), str(port))



def test_dispatcher_config_takes_the_nodes_bind_names(farm: LocalFarm) -> None:
    from p2pbuild.dispatcher import load_config

    text = farm.dispatcher_config.read_text()
    port = load_config(farm.dispatcher_config).port
    replace_in(farm.dispatcher_config, f'host = "127.0.0.1"\nport = {port}\n',
               f'bind = "127.0.0.1:{port}"\n')
    config = load_config(farm.dispatcher_config)
    assert (config.host, config.port) == ("127.0.0.1", port)
    # Both spellings at once: refused by name.
    both = text.replace("[api]\n", f'[api]\nbind = "127.0.0.1:{port}"\n')
    farm.dispatcher_config.write_text(both)
    one_line_error(run("dispatcher", "run", "--config", farm.dispatcher_config),
                   "bind, or host and port, not both")


def test_a_reader_that_goes_away_is_not_a_traceback(farm: LocalFarm) -> None:
    # `p2pbuild ... --json | head -0`: the pipe is closed before the command writes.
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run(
        [sys.executable, "-m", "p2pbuild", "trust", "show", "--json", "-f",
         str(farm.root / "keys" / "trust-list.bin")],
        stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )
    os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
