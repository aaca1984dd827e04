"""A Koji hub, a dispatcher that is its build host, and push nodes, in one trio run.

The hub is a child process (:class:`~p2pbuild.testing._kojihub.HubProcess`, so a test can
kill and restart it); the dispatcher and its Koji host (``p2pbuild._wiring``, with a
``[koji]`` section) and the nodes (:func:`~p2pbuild.testing._farm.start_push_node`) run in
the caller's nursery; :meth:`KojiFarm.koji` runs the real ``koji`` command line as a user
with an SSL client certificate. Used by ``tests/koji`` and ``bench/dispatch.py``::

    async with trio.open_nursery() as nursery:
        farm = await start_koji_farm(nursery, tmp, {"n1": ExecutorRunner(), ...})
        code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(srpm))
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import trio

from .._wiring import RunningService, load_service_config, serve_dispatcher
from ..dispatcher import RunningDispatcher, StaticFinder
from ..https import generate_tls_material
from ..koji import KojiHost
from ..node._service import JobRunner
from ._farm import FarmNode, start_push_node
from ._keys import TrustFixture
from ._kojihub import HubProcess, make_hub_pki, seed_hub, write_koji_cli_config

__all__ = ["HOST_NAME", "P2P_POLICIES", "PACKAGES", "KojiFarm", "start_koji_farm"]

HOST_NAME = "p2p-gw.example.org"
#: hub.conf [policy] as dispatcher/koji-hub-setup.md sets it: SRPM builds for *-p2p targets
#: by anyone (Koji's default allows them for admins only).
P2P_POLICIES = {
    "build_from_srpm": "has_perm admin :: allow\n"
                       "match target *-p2p :: allow\n"
                       "all :: deny Only admin can do this via default policy",
}
#: The packages on the destination tag's list (``koji add-pkg``): the test packages.
PACKAGES = ("hello", "hello-noarch")
KOJI = str(Path(sys.executable).with_name("koji"))


@attrs.define(eq=False)
class KojiFarm:
    tmp: Path
    hub: HubProcess
    fixture: TrustFixture
    dispatcher: RunningDispatcher
    host: KojiHost
    nodes: dict[str, FarmNode]
    user_config: Path
    admin_config: Path

    async def koji(self, *argv: str, admin: bool = False,
                   timeout: float = 120) -> tuple[int, str, str]:
        """Run ``koji ARGV`` as ``plainuser`` (or ``kojiadmin``): exit code, stdout, stderr."""
        config = self.admin_config if admin else self.user_config
        with trio.fail_after(timeout):
            done = await trio.run_process(
                [KOJI, "-c", str(config), "-p", "koji", *argv],
                capture_stdout=True, capture_stderr=True, check=False,
            )
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def hub_call(self, method: str, *args: Any) -> Any:
        """An anonymous call (or a ``testhub.*`` control) on the hub, blocking."""
        proxy = self.hub.control()
        func = proxy
        for part in method.split("."):
            func = getattr(func, part)
        return func(*args)

    async def call(self, method: str, *args: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: self.hub_call(method, *args))

    async def wait_task(self, task_id: int, states: tuple[str, ...],
                        timeout: float = 60) -> dict[str, Any]:
        import koji

        wanted = {koji.TASK_STATES[s] for s in states}
        with trio.fail_after(timeout):
            while True:
                info: dict[str, Any] = await self.call("getTaskInfo", task_id)
                if info["state"] in wanted:
                    return info
                await trio.sleep(0.1)


async def start_koji_farm(
    nursery: trio.Nursery,
    tmp: Path,
    runners: Mapping[str, JobRunner],
    fixture: TrustFixture,
    *,
    koji: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    hub_auth: str = "password",
    packages: Sequence[str] = PACKAGES,
    policies: Mapping[str, str] | None = None,
    build_types: Sequence[str] = ("make", "rpm"),
    other_hosts: Sequence[str] = (),
) -> KojiFarm:
    """Seed and start the hub, start one push node per ``runners`` entry (names from
    ``fixture``), and a dispatcher whose ``[koji]`` section (extended by ``koji``) logs in
    as the build host ``HOST_NAME`` with a password (``hub_auth="password"``, over HTTP) or
    its client certificate (``"ssl"``, over HTTPS). ``packages`` are on the list of the
    destination tag ``f40``; ``policies`` are hub.conf ``[policy]`` entries over
    :data:`P2P_POLICIES`; ``other_hosts`` are more build hosts in the ``p2p`` channel (no
    process runs them)."""
    host_password = secrets.token_urlsafe(16)
    pki = make_hub_pki(tmp / "pki", [HOST_NAME, "plainuser", "kojiadmin"])
    seed_hub(
        tmp / "hub",
        users={"kojiadmin": "", "plainuser": "", HOST_NAME: host_password},
        admins=("kojiadmin",),
        hosts={HOST_NAME: "x86_64", **{name: "x86_64" for name in other_hosts}},
        targets={"f40-p2p": ("f40-build", "f40"), "f40": ("f40-build", "f40")},
        packages={"f40": tuple(packages)}, policies={**P2P_POLICIES, **(policies or {})},
    )
    hub = HubProcess(tmp / "hub", tmp / "pki")
    await hub.start()
    finder = StaticFinder(fixture.trust_list)
    nodes = {}
    for name, runner in runners.items():
        node = await start_push_node(nursery, tmp / "nodes" / name, fixture.nodes[name],
                                     fixture.trust_list, runner, build_types=build_types)
        finder.put(node.entry())
        nodes[name] = node
    base = tmp / "dispatcher"
    base.mkdir()
    fixture.dispatchers["dispatcher-1"].save(base / "dispatcher.key")
    (base / "trust-list.bin").write_bytes(fixture.trust_list.to_bytes())
    (base / "tls").mkdir()
    generate_tls_material(base / "tls")
    (base / "koji-host.password").write_text(host_password + "\n")
    (base / "koji-host.password").chmod(0o600)
    section: dict[str, Any] = {
        "server": hub.url, "topurl": hub.topurl, "host": HOST_NAME,
        "authtype": "password", "password_file": "koji-host.password",
        "poll_interval_s": 0.2, "retry_interval_s": 0.5, "min_space_mb": 1,
    }
    if hub_auth == "ssl":
        section.update(server=hub.https_url, authtype="ssl",
                       cert=str(pki.clients[HOST_NAME]), serverca=str(pki.ca))
        del section["password_file"]
    section.update(koji or {})
    document = {
        "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin",
                       "synchronous": "NORMAL"},
        "api": {"port": 0},
        "engine": {"follow_interval_s": 2, "backoff_base_s": 0.05, "no_node_wait_s": 1,
                   **(engine or {})},
        "koji": section,
    }
    (base / "dispatcher.toml").write_text(tomli_w.dumps(document))
    config = load_service_config(base / "dispatcher.toml")
    running: RunningService = await nursery.start(
        lambda task_status: serve_dispatcher(config, finder=finder, task_status=task_status)
    )
    assert running.koji is not None
    user_config = write_koji_cli_config(tmp / "koji-user.conf", server=hub.https_url,
                                        topurl=hub.topurl, cert=pki.clients["plainuser"],
                                        serverca=pki.ca)
    admin_config = write_koji_cli_config(tmp / "koji-admin.conf", server=hub.https_url,
                                         topurl=hub.topurl, cert=pki.clients["kojiadmin"],
                                         serverca=pki.ca)
    farm = KojiFarm(tmp, hub, fixture, running.dispatcher, running.koji, nodes, user_config,
                    admin_config)
    code, out, err = await farm.koji("grant-cg-access", HOST_NAME, "p2p-build", "--new",
                                     admin=True)
    if code != 0:
        raise RuntimeError(f"koji grant-cg-access failed: {out}{err}")
    return farm
