"""The web view in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``, driven
by Playwright; no browser is downloaded) against a farm of real processes (``LocalFarm``:
``dht serve``, ``dispatcher run``, ``node run``, real ``rpmbuild`` in bubblewrap).

Playwright's sync API runs in one dedicated thread (its objects belong to the thread that
made them); the trio test hands it one step at a time. Set ``P2PBUILD_SCREENSHOTS=DIR`` to
keep screenshots of the pages the tests visit.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from e2e_farm import farm_of
from prometheus_client.parser import text_string_to_metric_families
from waits import wait_until

from p2pbuild.https import pinned_client
from p2pbuild.testing import NodeSpec

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
T = TypeVar("T")


class Browser:
    """One headless Chromium page, driven from a dedicated thread."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._playwright: Any = None
        self._browser: Any = None
        self.page: Any = None
        shots = os.environ.get("P2PBUILD_SCREENSHOTS")
        self.shots = Path(shots) if shots else None

    def _open(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        context = self._browser.new_context(ignore_https_errors=True, accept_downloads=True,
                                            viewport={"width": 1400, "height": 900})
        context.set_default_timeout(30_000)
        self.page = context.new_page()

    def page_without_javascript(self) -> Any:
        """In the browser's thread: a second page with JavaScript off."""
        context = self._browser.new_context(ignore_https_errors=True, java_script_enabled=False)
        context.set_default_timeout(30_000)
        return context.new_page()

    def _close(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    async def run(self, step: Callable[[], T]) -> T:
        future = self._thread.submit(step)
        return await trio.to_thread.run_sync(future.result)

    def shot(self, name: str) -> None:
        """In the browser's thread: keep a screenshot if asked to."""
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: tools/install-system-packages installs chromium")
    b = Browser()
    try:
        await b.run(b._open)
        yield b
    finally:
        with trio.CancelScope(shield=True):
            await b.run(b._close)
            b._thread.shutdown(wait=True)




def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_a_build_seen_in_the_browser_from_running_to_verified_and_downloaded(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob", pools=("nat",)),
             NodeSpec("carol-pull", "carol", pull=True, pools=("nat",))]
    async with farm_of(tmp_path, specs) as farm, browser() as b:
        page = b.page
        # The list is open before the build exists: it appears by the live update.
        await b.run(lambda: page.goto(farm.url + "/builds"))
        # Pool "nat": bob's push node and carol's pull node build it.
        submitted = await farm.submit(sources["slow"], pool="nat")
        nvr = "hello-1.0-2.slow"
        row = page.locator(f'tr[data-build="{submitted["id"]}"]')

        def running_in_list() -> None:
            row.locator(".state-running").wait_for()
            assert nvr in row.inner_text()
            b.shot("builds-running")

        await b.run(running_in_list)

        # Its page streams the push node's log while it builds (the pull node reports its
        # progress instead), and ends "verified" with both nodes' logs to download.
        def follow_build() -> tuple[str, str, list[str]]:
            row.locator("a", has_text=nvr).click()
            page.wait_for_url(f"**/builds/{submitted['id']}")
            log = page.locator("pre[data-log]").first
            log.wait_for()
            page.wait_for_function(
                "() => { const p = document.querySelector('pre[data-log]');"
                " return p && p.textContent.includes('Executing'); }", timeout=60_000)
            streamed: str = log.inner_text()
            pulled = page.locator("p.pulled").first
            pulled.wait_for()
            reported: str = pulled.inner_text()
            b.shot("build-running")
            page.locator("#build-state", has_text="verified").wait_for(timeout=60_000)
            b.shot("build-verified")
            logs = page.locator("ul.logs li").all_inner_texts()
            return streamed, reported, logs

        streamed, reported, logs = await b.run(follow_build)
        assert "Executing(%build)" in streamed or "Executing(%prep)" in streamed
        assert "carol" in reported and "pull node" in reported
        assert len(logs) == 2 and not any("kept by the pull node" in text for text in logs)

        build = await farm.build(submitted["id"])
        assert build["state"] == "verified"
        stored = Path(build["sink_path"])
        manifest = json.loads((stored / "manifest.json").read_text())
        (rpm,) = [a for a in manifest["artifacts"] if not a["name"].endswith(".src.rpm")]

        # The RPM downloads from the page with the SHA-256 the page and the manifest show.
        def download() -> tuple[str, str]:
            link = page.locator("table.files a", has_text=rpm["name"].rsplit("/", 1)[-1])
            shown = link.locator("xpath=ancestor::tr").locator("code.digest").inner_text()
            with page.expect_download() as info:
                link.click()
            target = tmp_path / "downloaded.rpm"
            info.value.save_as(target)
            return shown.strip(), _sha256(target)

        shown, downloaded = await b.run(download)
        assert downloaded == shown == rpm["sha256"]
        assert downloaded == _sha256(stored / "artifacts" / rpm["name"])

        # A push node's own /metrics (on its job API, pinned to its certificate).
        run = json.loads((farm.root / "nodes" / "bob-1" / "run.json").read_text())
        async with pinned_client(bytes.fromhex(run["tls_sha256"]),
                                 base_url=f"https://127.0.0.1:{run['api_port']}") as http:
            node_values = samples((await http.get("/metrics")).text)
        assert node_values[("p2pbuild_node_builds_total", (("state", "succeeded"),))] == 1
        assert node_values[("p2pbuild_node_sandbox_seconds_total", ())] >= 4  # %build sleeps 4 s

        # A verifying node's page: its recent build and its rating plot (server-made SVG).
        builder = build["attempts"][0]["node"]

        def node_page() -> tuple[str, int]:
            page.goto(f"{farm.url}/nodes/{builder}")
            page.locator("figure.plot svg polyline").first.wait_for()
            b.shot("node")
            return page.locator("table.recent").inner_text(), page.locator("svg").count()

        recent, plots = await b.run(node_page)
        assert nvr in recent and "verified" in recent and plots == 1

        # /metrics parses with prometheus-client's parser and counts the build.
        async with farm.http() as http:
            response = await http.get("/metrics")
        values = samples(response.text)
        assert values[("p2pbuild_dispatcher_builds", (("state", "verified"),))] == 1
        assert values[("p2pbuild_dispatcher_verifications_total", (("outcome", "agreed"),))] == 1
        assert values[("p2pbuild_dispatcher_dispatch_overhead_seconds_count", ())] == 1
        assert values[("p2pbuild_dht_lookups_total", ())] > 0

        # The nodes page shows a stopped node as offline within its status interval.
        carol = str(farm.node_keys["carol-pull"])
        await b.run(lambda: page.goto(farm.url + "/nodes"))

        def all_online() -> None:
            for key in farm.node_keys.values():
                page.locator(f'tr[data-node="{key}"] .state-online').wait_for()
            b.shot("nodes-online")

        await b.run(all_online)
        status_interval = 2.0  # LocalFarm's [records] status_interval_s
        assert await farm.stop("carol-pull") == 0  # SIGTERM: it drains and says so as it leaves
        exited = trio.current_time()

        async def server_says_offline() -> bool:
            async with farm.http() as http:
                nodes = (await http.get("/v1/web/nodes")).json()["nodes"]
            return bool({n["node"]: n["state"] for n in nodes}[carol] == "offline")

        await wait_until(server_says_offline, 30, "the nodes page lists carol-pull as offline")
        assert trio.current_time() - exited <= status_interval

        def carol_offline() -> None:
            page.locator(f'tr[data-node="{carol}"] .state-offline').wait_for(timeout=30_000)
            b.shot("nodes-offline")

        await b.run(carol_offline)
        # The open page reloads itself every 3 s.
        assert trio.current_time() - exited <= status_interval + 3.0 + 1.0
        others = await b.run(lambda: [
            page.locator(f'tr[data-node="{farm.node_keys[n]}"] .state').inner_text()
            for n in ("alice-1", "bob-1")
        ])
        assert others == ["online", "online"]


async def test_a_tampering_nodes_mismatch_page_shows_the_differing_file(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [NodeSpec("alice-1", "alice"), NodeSpec("mallory-1", "mallory", tamper=True)]
    async with farm_of(tmp_path, specs) as farm, browser() as b:
        submitted = await farm.submit(sources["hello"])
        waiting = await farm.wait_build(submitted["id"], lambda x: bool(x["report"]))
        # No third operator can break the tie: the build fails at once, the mismatch its reason.
        assert waiting["state"] == "failed"
        page = b.page

        def mismatch() -> tuple[list[str], str, bool]:
            page.goto(f"{farm.url}/builds/{submitted['id']}")
            page.locator("section.difference").wait_for()
            files = page.locator("table.differing td.file").all_inner_texts()
            groups = page.locator("ol.groups").inner_text()
            has_diffoscope = page.locator("pre.diffoscope").count() == 1
            b.shot("build-mismatch")
            return files, groups, has_diffoscope

        files, groups, has_diffoscope = await b.run(mismatch)
        assert files and all(name.endswith(".rpm") for name in files)
        assert "alice" in groups and "mallory" in groups
        if shutil.which("diffoscope"):
            assert has_diffoscope
        listing = await b.run(lambda: (page.goto(farm.url + "/builds"),
                                       page.locator(".state-mismatch").count())[1])
        assert listing == 1

        # Without JavaScript every page is whole: rendered on the server.
        def without_javascript() -> dict[str, str]:
            plain = b.page_without_javascript()
            texts = {}
            for path in ("/builds", f"/builds/{submitted['id']}", "/nodes", "/trust"):
                plain.goto(farm.url + path)
                texts[path] = plain.locator("main").inner_text()
            plain.context.close()
            return texts

        texts = await b.run(without_javascript)
        assert "hello-1.0-1" in texts["/builds"]
        assert files[0] in texts[f"/builds/{submitted['id']}"]
        assert "alice" in texts["/nodes"] and "mallory" in texts["/nodes"]
        assert "version 1" in texts["/trust"]
