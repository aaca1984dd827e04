"""On-demand nodes: the [on_demand] configuration, and a real pull-mode daemon that sleeps
when idle and is woken by the job its long-poll receives."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from waits import wait_until

from p2pbuild import BuildType, Job, JobSpec, ResultState, SourceArtifact, Target
from p2pbuild.dispatcher._pull import PullQueue
from p2pbuild.dispatcher._pull_routes import serve_pull
from p2pbuild.https import generate_tls_material
from p2pbuild.node import ConfigError, parse_config
from p2pbuild.testing import hello_tarball, make_trust_list
from p2pbuild.testing._nodes import open_node_daemons, serve_files
from p2pbuild.testing._runner import InstantRunner

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]


def test_on_demand_settings_are_read_and_checked(tmp_path: Path) -> None:
    config = parse_config({
        "node": {"data_dir": str(tmp_path)},
        "on_demand": {"idle_s": 300, "wake_s": 90, "wake_url": "https://wake.example.org/n1",
                      "hook": "/usr/local/bin/power --vm n1"},
    })
    assert config.on_demand is not None
    assert config.on_demand.idle_s == 300 and config.on_demand.wake_s == 90
    assert config.on_demand.hook == ("/usr/local/bin/power", "--vm", "n1")
    assert parse_config({"node": {"data_dir": str(tmp_path)}}).on_demand is None
    for table, needle in [
        ({"wake_s": 0}, "on_demand.wake_s"),
        ({"idle_s": 0.5}, "on_demand.idle_s"),
        ({"wake_url": "http://x/"}, "on_demand.wake_url: must be an https:// URL"),
        ({"hook": "relative/path"}, "on_demand.hook: must start with an absolute path"),
        ({"hook": "/bin/x 'unclosed"}, "on_demand.hook: cannot be split"),
        ({"sleep": 1}, "on_demand.sleep: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=needle) as info:
            parse_config({"node": {"data_dir": str(tmp_path)}, "on_demand": table})
        assert "\n" not in str(info.value)


@pytest.mark.slow
async def test_a_standby_pull_node_is_woken_by_its_long_poll_and_builds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {hook_log}\n')
    hook.chmod(0o755)
    (tmp_path / "sources").mkdir()
    package = hello_tarball(tmp_path / "sources" / "hello-1.0.tar.gz")
    files_url, _ = await nursery.start(serve_files, tmp_path / "sources", tmp_path / "ftls")
    (tmp_path / "tls").mkdir()
    tls = generate_tls_material(tmp_path / "tls", "localhost")
    queue = PullQueue(DISPATCHER.public_key, FIXTURE.trust_list, tmp_path / "uploads")
    port = await nursery.start(serve_pull, queue, tls)
    overrides = {
        "pull": {"dispatchers": [{"url": f"https://127.0.0.1:{port}",
                                  "key": str(DISPATCHER.public_key),
                                  "tls_sha256": tls.sha256.hex()}],
                 "poll_timeout_s": 30},
        "on_demand": {"idle_s": 1, "wake_s": 30, "hook": str(hook)},
    }
    async with open_node_daemons(
        tmp_path / "nodes", [NODE], FIXTURE.trust_list, push=False,
        runner=lambda _: InstantRunner(), overrides=overrides,
    ) as (daemon,):
        assert daemon.on_demand is not None
        capability = daemon.capability_record.body  # type: ignore[union-attr]
        assert capability.wake_s == 30 and capability.wake_url == ""  # type: ignore[union-attr]
        await wait_until(lambda: daemon.status_record.body.standby,  # type: ignore[union-attr]
                         30, "the node published its standby")
        # Published first, then the hook (which may stop the machine).
        await wait_until(hook_log.exists, 10, "the standby hook ran")
        assert hook_log.read_text().split() == ["standby"]
        source = SourceArtifact(package.path.name, package.path.stat().st_size,
                                bytes.fromhex(package.sha256), f"{files_url}/hello-1.0.tar.gz")
        spec = JobSpec(source, BuildType.MAKE, Target(daemon.detected.arch, daemon.detected.os),
                       time_limit_s=120)
        job = Job.create(DISPATCHER, spec, issued_at=int(time.time()), lifetime=600,
                         node=NODE.public_key)
        queue.offer(NODE.public_key, job)
        with trio.fail_after(30):
            result = await queue.wait_result(job.job_id)
        await wait_until(lambda: not daemon.status_record.body.standby,  # type: ignore[union-attr]
                         30, "the node published that it is awake")
        assert result.state is ResultState.SUCCEEDED
        assert daemon.on_demand.wakes == 1
        assert hook_log.read_text().split() == ["standby", "wake"]
