"""The hub over HTTP(S) (a ``http.server`` handler), as a child process
(:class:`HubProcess`, ``python -m p2pbuild.testing._kojihub``), and the ``koji`` command's
configuration for it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xmlrpc.client
from pathlib import Path
from typing import Any

import attrs

from ._hub import KojiTestHub
from ._pki import HubPki
from ._wire import HubUrls


@attrs.define(eq=False)
class HubProcess(HubUrls):
    """The hub as a child process (``python -m p2pbuild.testing._kojihub``), for tests that
    kill and restart it. :meth:`start` keeps the ports of the first start, so the URLs stay
    the same across restarts."""

    data_dir: Path
    pki_dir: Path | None = None
    port: int = 0
    https_port: int = 0
    process: Any = None

    async def start(self) -> None:
        import trio

        argv = [sys.executable, "-m", "p2pbuild.testing._kojihub", str(self.data_dir),
                "--port", str(self.port), "--https-port", str(self.https_port)]
        if self.pki_dir is not None:
            argv += ["--pki", str(self.pki_dir)]
        self.process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the test hub exited before it listened")
                line += chunk
        info = json.loads(line)
        self.port, self.https_port = int(info["port"]), int(info["https_port"])

    async def wait_exit(self) -> int:
        code: int = await self.process.wait()
        return code

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self.process.stdin.aclose()
        await self.process.stdout.aclose()
        self.process = None

    def control(self) -> xmlrpc.client.ServerProxy:
        """A plain XML-RPC proxy for the ``testhub.*`` controls and anonymous calls."""
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)


def write_koji_cli_config(path: Path, *, server: str, topurl: str, cert: Path,
                          serverca: Path, profile: str = "koji") -> Path:
    """A config file for the ``koji`` command (``koji -c PATH -p PROFILE ...``) that logs
    in with an SSL client certificate (the CLI takes passwords only on its command line)."""
    lines = [f"[{profile}]", f"server = {server}", f"weburl = {server.rsplit('/', 1)[0]}/koji",
             f"topurl = {topurl}", "poll_interval = 1", "max_retries = 3", "retry_interval = 1",
             "anon_retry = true", "authtype = ssl", f"cert = {cert}", f"serverca = {serverca}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="p2pbuild's test Koji hub")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--pki", type=Path, help="directory from make_hub_pki")
    args = parser.parse_args(argv)
    pki = None
    if args.pki is not None:
        pki = HubPki(args.pki / "ca.pem", args.pki / "server.pem", args.pki / "server.key", {})
    hub = KojiTestHub(args.data_dir, args.port, args.https_port, pki, exit_on_crash=True)
    hub.start()
    print(json.dumps({"url": hub.url, "https_url": hub.https_url if pki else None,
                      "topurl": hub.topurl, "port": hub.port, "https_port": hub.https_port}),
          flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or kills us)
    finally:
        hub.stop()
    return 0


