"""A fast in-process job runner for tests of the node's job service and HTTPS API."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from .._jobs import FileDigest, Job, ResultState
from ..node._service import LocalFile, LogSink, RunReport

__all__ = ["InstantRunner"]


@attrs.define(eq=False)
class InstantRunner:
    """Pretends to build: writes ``log_lines`` to the log and ``artifacts`` (name to
    content) as files, then reports ``state``.

    If ``gate`` is set, the build waits for it after the first log line, so a test can
    follow the live log or cancel a running job. ``runs`` lists the jobs run so far;
    :meth:`wait_runs` waits for them.
    """

    artifacts: Mapping[str, bytes] = attrs.field(factory=lambda: {"out/hello.txt": b"hello\n"})
    log_lines: tuple[bytes, ...] = (b"building\n", b"done\n")
    state: ResultState = ResultState.SUCCEEDED
    gate: trio.Event | None = None
    runs: list[Job] = attrs.field(factory=list)
    _started: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def wait_runs(self, count: int = 1) -> None:
        """Return once ``count`` jobs have started (a gated one is then at its gate, or on
        its way there)."""
        while len(self.runs) < count:
            await self._started.wait()

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        self.runs.append(job)
        self._started.set()
        self._started = trio.Event()
        workdir.mkdir(parents=True)
        full_log = b""
        for i, line in enumerate(self.log_lines):
            await log(line)
            full_log += line
            if i == 0 and self.gate is not None:
                await self.gate.wait()
        outputs = []
        for name, content in sorted(self.artifacts.items()):
            path = workdir / "artifacts" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            digest = FileDigest(name, len(content), hashlib.sha256(content).digest())
            outputs.append(LocalFile(digest, path))
        log_path = workdir / "build.log"
        log_path.write_bytes(full_log)
        log_file = LocalFile(
            FileDigest("build.log", len(full_log), hashlib.sha256(full_log).digest()), log_path
        )
        return RunReport(
            state=self.state,
            exit_code=0 if self.state is ResultState.SUCCEEDED else 1,
            environment={"arch": "x86_64", "os": "fedora-41", "runner": "instant"},
            artifacts=tuple(outputs),
            logs=(log_file,),
        )
