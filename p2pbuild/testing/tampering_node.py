"""A node that lies, for end-to-end tests and demos only: ``python -m
p2pbuild.testing.tampering_node --config node.toml``.

It is the real node daemon (``p2pbuild node run``: DHT, HTTPS API or pull, state file,
signed records) with one change: its runner builds for real in the sandbox and then flips
one byte in every ``.rpm`` artifact before the node hashes and signs the result. The result
is validly signed and the files re-hash to what it says, so only comparison with another
operator's build can catch it, which is the point of the farm (design item 10).

The production daemon has no switch for this; the tampering lives only here, in a module a
deployment never runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from .._errors import P2PBuildError
from .._jobs import FileDigest, Job, ResultState
from ..node._config import load_config
from ..node._daemon import executor_limits
from ..node._runner import ExecutorRunner
from ..node._serve import serve_node
from ..node._service import JobRunner, LocalFile, LogSink, RunReport

__all__ = ["TamperingRunner", "main"]

_log = logging.getLogger("p2pbuild.testing.tampering_node")


def _flip(path: Path) -> tuple[int, bytes]:
    """Flip one bit in the middle of ``path``; its new size and SHA-256."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return len(data), hashlib.sha256(data).digest()


@attrs.frozen
class TamperingRunner:
    """Runs ``inner``, then changes one byte in the middle of each ``.rpm`` artifact of a
    successful build (and reports the new digests, so the signed result matches the files)."""

    inner: JobRunner

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        report = await self.inner.run(job, workdir, log)
        if report.state is not ResultState.SUCCEEDED:
            return report
        artifacts = []
        for item in report.artifacts:
            if item.digest.name.endswith(".rpm"):
                size, sha256 = await trio.to_thread.run_sync(_flip, item.path)
                item = LocalFile(FileDigest(item.digest.name, size, sha256), item.path)
                _log.warning("tampered with %s of job %s", item.digest.name, job.id_hex)
            artifacts.append(item)
        return attrs.evolve(report, artifacts=tuple(artifacts))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a tampering node from a ``node.toml``; prints the same start line as
    ``p2pbuild node run`` and stops on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m p2pbuild.testing.tampering_node",
        description="TEST ONLY: a real node daemon that flips a byte in every RPM it builds.",
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
        return trio.run(
            serve_node, config, TamperingRunner(ExecutorRunner(executor_limits(config)))
        )
    except P2PBuildError as exc:
        print(f"tampering_node: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
