"""A throwaway p2pbuild deployment on loopback, run as real child processes.

:meth:`LocalFarm.create` writes everything a small farm needs into one directory:

    keys/         three maintainer keys and the 2-of-3 signed trust list
    dispatcher/   dispatcher.key, tls/, dispatcher.toml, client.toml; state/ and repo/
                  appear when it runs (SQLite database; verified builds with their proofs)
    nodes/<name>/ node.key, tls/, trust-list.bin, node.toml (one per :class:`NodeSpec`)
    logs/         <name>.out (the child's start line) and <name>.log (its log)

:func:`open_local_farm` runs it: ``p2pbuild dht serve`` (the bootstrap node), ``p2pbuild
dispatcher run`` and one ``p2pbuild node run`` per node, or the test-only
:mod:`p2pbuild.testing.tampering_node` for a node with ``tamper=True``, each a child of
``sys.executable`` in the farm's nursery. Leaving the block stops them in order (nodes,
dispatcher, bootstrap), each with SIGTERM and, after a grace period, SIGKILL; so does an
error or Ctrl-C, through the nursery's cancellation. Tests kill and restart single
processes (:meth:`LocalFarm.kill`, :meth:`LocalFarm.start`).

Everything is real: UDP DHT, HTTPS with pinned certificates, ``rpmbuild`` in bubblewrap,
SQLite. Timings are shortened for a farm on one machine (:data:`FAST_ENGINE`).
Used by ``p2pbuild demo`` and ``tests/e2e``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import tomli_w
import trio

from .._errors import LocalError
from .._identity import Identity, PublicKey, Role
from .._trust import TrustEntry, TrustList
from ..dispatcher._config import hash_token
from ..https import generate_tls_material, pinned_client
from ..node._detect import detect

__all__ = ["FAST_ENGINE", "FarmError", "LocalFarm", "NodeSpec", "open_local_farm"]

#: Engine timings for a farm on one machine: a dead node is noticed within seconds.
FAST_ENGINE: Mapping[str, float] = {
    "follow_interval_s": 5,
    "unreachable_after_s": 3,
    "backoff_base_s": 0.2,
    "backoff_max_s": 4,
    "node_retry_base_s": 1,
    "no_node_wait_s": 30,
    "heartbeat_interval_s": 5,
    "node_timeout_s": 10,
}

TERMINAL = frozenset({"verified", "failed", "cancelled"})
SEED = "bootstrap"
DISPATCHER = "dispatcher"


class FarmError(LocalError):
    """A process of the local farm did not start, died, or a wait ran out of time."""

    code = "farm"


@attrs.frozen
class NodeSpec:
    """One node of the farm. ``pull``: no listening port, it long-polls the dispatcher;
    ``tamper``: the test-only tampering daemon; ``machine``: override "vm"/"metal"."""

    name: str
    operator: str
    pull: bool = False
    pools: tuple[str, ...] = ()
    tamper: bool = False
    slots: int = 1
    machine: str | None = None


def _free_port(kind: socket.SocketKind) -> int:
    # Chosen before the child binds it, so configs can name it (and a restarted dispatcher
    # comes back at the same URL); on loopback the window for a clash is negligible.
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_toml(path: Path, document: Mapping[str, Any], *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tomli_w.dumps(document))
    else:
        path.write_text(tomli_w.dumps(document))


@attrs.define(eq=False)
class LocalFarm:
    """A farm's files and, while :func:`open_local_farm` runs it, its processes."""

    root: Path
    specs: tuple[NodeSpec, ...]
    arch: str
    os: str
    seed_port: int
    dispatcher_port: int
    token: str
    trust_list: TrustList
    maintainers: tuple[Identity, ...]
    dispatcher_key: PublicKey
    dispatcher_pin: bytes
    node_keys: dict[str, PublicKey]
    #: Grace between SIGTERM and SIGKILL when stopping a process.
    grace_s: float = 5.0
    processes: dict[str, trio.Process] = attrs.field(factory=dict, init=False)
    #: Each process's start line (parsed JSON), by name.
    started: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    # -- files ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        specs: Sequence[NodeSpec],
        *,
        engine: Mapping[str, float] = FAST_ENGINE,
        trust_days: int = 7,
    ) -> LocalFarm:
        """Write a farm into ``root`` (created; must not hold one already): keys, a 2-of-3
        trust list naming the dispatcher and every node with its operator, configs. The
        target platform is this host's (arch and OS as a node detects them)."""
        root = root.resolve()
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or {SEED, DISPATCHER} & set(names):
            raise FarmError("node names must be distinct and not 'bootstrap' or 'dispatcher'")
        for sub in ("keys", "dispatcher/tls", "nodes", "logs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        detected = detect(root)
        maintainers = tuple(Identity.generate(Role.MAINTAINER) for _ in range(3))
        for i, m in enumerate(maintainers, start=1):
            m.save(root / "keys" / f"maintainer-{i}.key")
        dispatcher = Identity.generate(Role.DISPATCHER)
        dispatcher.save(root / "dispatcher" / "dispatcher.key")
        nodes = {s.name: Identity.generate(Role.NODE) for s in specs}
        entries = [TrustEntry(m.public_key, Role.MAINTAINER, "maintainers") for m in maintainers]
        entries.append(TrustEntry(dispatcher.public_key, Role.DISPATCHER, "farm"))
        entries += [TrustEntry(nodes[s.name].public_key, Role.NODE, s.operator) for s in specs]
        trust = TrustList(
            1, int(time.time()) + trust_days * 86_400, 2,
            tuple(sorted(entries, key=lambda e: e.key)),
        )
        trust = trust.sign(maintainers[0]).sign(maintainers[1])
        trust_bytes = trust.to_bytes()
        (root / "keys" / "trust-list.bin").write_bytes(trust_bytes)

        seed_port = _free_port(socket.SOCK_DGRAM)
        port = _free_port(socket.SOCK_STREAM)
        tls = generate_tls_material(root / "dispatcher" / "tls", "localhost")
        token = os.urandom(24).hex()
        (root / "dispatcher" / "trust-list.bin").write_bytes(trust_bytes)
        _write_toml(root / "dispatcher" / "dispatcher.toml", {
            "dispatcher": {
                "key_file": "dispatcher.key", "trust_list": "trust-list.bin", "state_dir": "state",
                "repository": "repo", "default_arch": detected.arch,
                "default_os": detected.os,
            },
            "api": {"host": "127.0.0.1", "port": port, "tls_dir": "tls"},
            "dht": {"host": "127.0.0.1", "port": 0, "bootstrap": [f"127.0.0.1:{seed_port}"],
                    "list_arches": [detected.arch]},
            "clients": [{"user": "demo", "role": "admin", "token_sha256": hash_token(token)}],
            "engine": dict(engine),
        })
        url = f"https://127.0.0.1:{port}"
        _write_toml(root / "dispatcher" / "client.toml",
                    {"url": url, "tls_sha256": tls.sha256.hex(), "token": token}, private=True)

        for spec in specs:
            directory = root / "nodes" / spec.name
            (directory / "tls").mkdir(parents=True)
            directory.chmod(0o700)
            nodes[spec.name].save(directory / "node.key")
            generate_tls_material(directory / "tls", "localhost")
            (directory / "trust-list.bin").write_bytes(trust_bytes)
            document: dict[str, Any] = {
                "node": {"data_dir": str(directory), "operator": spec.operator,
                         "pools": list(spec.pools)},
                "dht": {"bind": "127.0.0.1:0", "bootstrap": [f"127.0.0.1:{seed_port}"]},
                "api": {"enabled": not spec.pull, "bind": "127.0.0.1:0"},
                "limits": {"slots": spec.slots},
                "records": {"status_interval_s": 2, "status_lifetime_s": 30},
                "shutdown": {"grace_s": 1},
            }
            if spec.pull:
                document["pull"] = {"poll_timeout_s": 10, "dispatchers": [{
                    "url": url, "key": str(dispatcher.public_key),
                    "tls_sha256": tls.sha256.hex(),
                }]}
            if spec.machine:
                document["capability"] = {"machine": spec.machine}
            _write_toml(directory / "node.toml", document)
        return cls(
            root=root, specs=tuple(specs), arch=detected.arch, os=detected.os,
            seed_port=seed_port, dispatcher_port=port, token=token, trust_list=trust,
            maintainers=maintainers, dispatcher_key=dispatcher.public_key,
            dispatcher_pin=tls.sha256,
            node_keys={name: identity.public_key for name, identity in nodes.items()},
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.dispatcher_port}"

    @property
    def client_config(self) -> Path:
        return self.root / "dispatcher" / "client.toml"

    @property
    def dispatcher_config(self) -> Path:
        return self.root / "dispatcher" / "dispatcher.toml"

    @property
    def repository(self) -> Path:
        return self.root / "dispatcher" / "repo"

    @property
    def database(self) -> Path:
        return self.root / "dispatcher" / "state" / "dispatcher.db"

    def spec(self, name: str) -> NodeSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise FarmError(f"no node named {name}")

    def node_name(self, key: str | PublicKey) -> str:
        """The name of the node with public key ``key`` (text or :class:`PublicKey`)."""
        for name, public in self.node_keys.items():
            if str(public) == str(key):
                return name
        raise FarmError(f"no node has key {key}")

    def command(self, name: str) -> list[str]:
        """The command line of process ``name`` (``bootstrap``, ``dispatcher`` or a node)."""
        # -P: the current directory is not put on sys.path, so a folder there named
        # like the package (the folder holding a clone of it) cannot shadow it.
        python = [sys.executable, "-P", "-m"]
        if name == SEED:
            return [*python, "p2pbuild", "dht", "serve", "--bind",
                    f"127.0.0.1:{self.seed_port}", "--json", "--log-interval", "0"]
        if name == DISPATCHER:
            return [*python, "p2pbuild", "dispatcher", "run", "--config",
                    str(self.dispatcher_config)]
        config = str(self.root / "nodes" / name / "node.toml")
        if self.spec(name).tamper:
            return [*python, "p2pbuild.testing.tampering_node", "--config", config]
        return [*python, "p2pbuild", "node", "run", "--config", config]

    # -- processes --------------------------------------------------------------------------

    async def _terminate(self, process: trio.Process) -> None:
        process.terminate()
        with trio.move_on_after(self.grace_s):
            await process.wait()
        if process.returncode is None:
            process.kill()

    async def _child(
        self, name: str, *, task_status: trio.TaskStatus[trio.Process]
    ) -> None:
        logs = self.root / "logs"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (logs / f"{name}.out").open("ab") as out, (logs / f"{name}.log").open("ab") as err:
            await trio.run_process(
                self.command(name), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                check=False, env=env, cwd=self.root, deliver_cancel=self._terminate,
                task_status=task_status,
            )

    def _tail(self, name: str) -> str:
        try:
            lines = (self.root / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""

    async def start(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Start process ``name`` in the farm's nursery and return its start line once it
        printed one. Raises :class:`FarmError` if it exits first or takes over ``timeout``."""
        if self._nursery is None:
            raise FarmError("the farm is not running (use open_local_farm)")
        current = self.processes.get(name)
        if current is not None and current.returncode is None:
            raise FarmError(f"{name} is already running")
        out = self.root / "logs" / f"{name}.out"
        offset = out.stat().st_size if out.exists() else 0
        process: trio.Process = await self._nursery.start(self._child, name)
        self.processes[name] = process
        with trio.move_on_after(timeout):
            while True:
                with out.open("rb") as f:
                    f.seek(offset)
                    text = f.read()
                if b"\n" in text:
                    self.started[name] = json.loads(text.split(b"\n", 1)[0])
                    return self.started[name]
                if process.returncode is not None:
                    raise FarmError(f"{name} exited with status {process.returncode} before it "
                                    f"was ready: {self._tail(name)}")
                await trio.sleep(0.05)
        raise FarmError(f"{name} did not start within {timeout:g}s: {self._tail(name)}")

    def _require_running(self, *names: str) -> None:
        for name in names:
            process = self.processes.get(name)
            if process is None or process.returncode is not None:
                status = "never started" if process is None else (
                    f"exited with status {process.returncode}")
                raise FarmError(f"{name} {status}: {self._tail(name)}")

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` now (a machine that loses power)."""
        process = self.processes[name]
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)

    async def stop(self, name: str) -> int | None:
        """SIGTERM process ``name``, SIGKILL after the grace period; its exit status."""
        process = self.processes.get(name)
        if process is None:
            return None
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                await self._terminate(process)
                await process.wait()
        return process.returncode

    async def wait_exit(self, name: str) -> int:
        return await self.processes[name].wait()

    async def stop_all(self) -> None:
        """Stop every process: nodes first (they publish that they leave), then the
        dispatcher, then the bootstrap node."""
        nodes = [n for n in self.processes if n not in (SEED, DISPATCHER)]
        for group in (nodes, [DISPATCHER], [SEED]):
            async with trio.open_nursery() as nursery:
                for name in group:
                    nursery.start_soon(self.stop, name)

    async def start_all(
        self, *, nodes: Iterable[str] | None = None,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """Start the bootstrap node, the dispatcher and ``nodes`` (default: all) and wait
        until the dispatcher sees every one of those nodes in the DHT."""
        names = list(nodes) if nodes is not None else [s.name for s in self.specs]
        for name in (SEED, DISPATCHER):
            line = await self.start(name)
            if progress is not None:
                progress(name, line)

        async def one(name: str) -> None:
            line = await self.start(name)
            if progress is not None:
                progress(name, line)

        with _one_error():
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)
        await self.wait_nodes(names)

    # -- the dispatcher's API ---------------------------------------------------------------------

    def http(self, timeout: float = 30.0) -> httpx.AsyncClient:
        """A client for the dispatcher's API, pinned to its certificate."""
        return pinned_client(self.dispatcher_pin, base_url=self.url, timeout=timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    async def get(self, path: str) -> Any:
        async with self.http() as http:
            response = await http.get(path, headers=self.headers)
        if response.status_code != 200:
            raise FarmError(f"GET {path}: HTTP {response.status_code} {response.text[:200]}")
        return response.json()

    async def nodes(self) -> list[dict[str, Any]]:
        body = await self.get("/v1/nodes")
        nodes: list[dict[str, Any]] = body["nodes"]
        return nodes

    async def build(self, build_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await self.get(f"/v1/builds/{build_id}")
        return body

    async def wait_nodes(self, names: Iterable[str], *, timeout: float = 30.0) -> None:
        """Wait until the dispatcher lists every node in ``names`` as in the directory."""
        wanted = {str(self.node_keys[n]) for n in names}
        seen: set[str] = set()
        with trio.move_on_after(timeout):
            while True:
                self._require_running(DISPATCHER, *names)
                try:
                    seen = {n["node"] for n in await self.nodes() if n.get("in_directory")}
                except (httpx.HTTPError, FarmError):
                    seen = set()
                if wanted <= seen:
                    return
                await trio.sleep(0.3)
        missing = sorted(self.node_name(k) for k in wanted - seen)
        raise FarmError(f"nodes not in the directory after {timeout:g}s: {', '.join(missing)}")

    async def submit(self, source: Path, **params: str | int) -> dict[str, Any]:
        """Upload ``source`` as a build (``POST /v1/builds``); the build's JSON."""
        query = {"name": source.name, "build_type": "rpm", **{k: str(v) for k, v in
                                                              params.items()}}
        async with self.http() as http:
            response = await http.post(
                "/v1/builds", params=query, content=source.read_bytes(),
                headers={**self.headers, "content-type": "application/x-rpm"},
            )
        if response.status_code != 202:
            raise FarmError(f"submit: HTTP {response.status_code} {response.text[:200]}")
        body: dict[str, Any] = response.json()
        return body

    async def wait_build(
        self, build_id: str, until: Callable[[dict[str, Any]], bool] | None = None,
        *, timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Poll the build until ``until(build)`` (default: a terminal state); the build.
        Raises :class:`FarmError` after ``timeout`` seconds."""
        check = until or (lambda b: b["state"] in TERMINAL)
        build: dict[str, Any] = {}
        with trio.move_on_after(timeout):
            while True:
                try:
                    build = await self.build(build_id)
                except httpx.HTTPError:
                    build = {}
                if build and check(build):
                    return build
                await trio.sleep(0.2)
        raise FarmError(f"build {build_id} did not get there within {timeout:g}s: "
                        f"{build.get('state')} {build.get('reason')}")

    async def cli(self, *argv: str) -> Any:
        """Run ``p2pbuild ARGV --client-config <the farm's> --json`` as a child process;
        its parsed JSON output. Raises :class:`FarmError` on a non-zero exit."""
        command = [sys.executable, "-P", "-m", "p2pbuild", *argv,
                   "--client-config", str(self.client_config), "--json"]
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False)
        if done.returncode != 0:
            raise FarmError(f"p2pbuild {' '.join(argv)}: exit {done.returncode}: "
                            f"{done.stderr.decode(errors='replace').strip()[-300:]}")
        return json.loads(done.stdout)


@asynccontextmanager
async def open_local_farm(farm: LocalFarm) -> AsyncIterator[LocalFarm]:
    """Run ``farm``'s processes in a nursery for the block (start them with
    :meth:`LocalFarm.start_all` or :meth:`LocalFarm.start`); stop them all when it exits,
    normally or not."""
    with _one_error():
        async with trio.open_nursery() as nursery:
            farm._nursery = nursery
            try:
                yield farm
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(3 * farm.grace_s + 5):
                        await farm.stop_all()
                farm._nursery = None
                nursery.cancel_scope.cancel()


@contextmanager
def _one_error() -> Iterator[None]:
    """Raise a nursery's only error as it is (an error of the block, or of one process's
    task), so that callers and the CLI see a ``FarmError`` rather than a group of one."""
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None
