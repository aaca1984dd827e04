"""The real job runner: fetch the job's source, build it with the sandboxed executor.

:class:`ExecutorRunner` implements the job service's :class:`JobRunner` protocol over
:func:`~p2pbuild.node.run_build`. The node's job service already bounds concurrency, so the
runner calls ``run_build`` directly (not :class:`~p2pbuild.node.Executor`, whose context
manager removes the results that the API still has to serve).

The source comes from ``job.spec.source.url`` over HTTPS. The signed SHA-256, not the TLS
connection, makes it authentic, so the fetch does not verify the server's certificate; it
streams into the job's directory, stops at the signed size, and the executor re-hashes the
file before building. Inline upload (an empty URL) is not supported yet: such a job is
rejected with :class:`BadSourceError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import httpx
import trio

from .._jobs import FileDigest, Job, ResultState, SourceArtifact
from ._buildroot import BuildrootCache
from ._errors import BadSourceError, BuildrootError, SourceDigestError
from ._executor import BuildOutcome, BuildSpec, Limits, OutputFile, run_build
from ._sandbox import Sandbox
from ._service import LocalFile, LogSink, RunReport

__all__ = ["ExecutorRunner", "SourceFetcher", "fetch_source_https"]

#: Puts the job's source at the given path, or raises a RemoteError.
SourceFetcher = Callable[[SourceArtifact, Path], Awaitable[None]]

_ENV_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


async def fetch_source_https(source: SourceArtifact, dest: Path, *, timeout: float = 300) -> None:
    """Download ``source.url`` to ``dest``, refusing more than ``source.size`` bytes or
    another SHA-256.

    Raises :class:`BadSourceError` (no URL, HTTP error status, wrong size, network failure)
    or :class:`SourceDigestError`.
    """
    if source.inline:
        raise BadSourceError("inline source upload is not supported by this node yet")
    digest = hashlib.sha256()
    size = 0
    try:
        async with (
            httpx.AsyncClient(verify=False, timeout=timeout, trust_env=False) as client,
            client.stream("GET", source.url) as response,
        ):
            if response.status_code != 200:
                raise BadSourceError(f"source fetch answered HTTP {response.status_code}")
            async with await trio.open_file(dest, "wb") as f:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > source.size:
                        raise BadSourceError(f"source is larger than the signed {source.size}")
                    digest.update(chunk)
                    await f.write(chunk)
    except httpx.HTTPError as exc:
        raise BadSourceError(f"cannot fetch the source: {exc.__class__.__name__}") from None
    if size != source.size:
        raise BadSourceError(f"source is {size} bytes, the job says {source.size}")
    if digest.digest() != source.sha256:
        raise SourceDigestError("the fetched source does not match the job's SHA-256")


def _local_files(items: tuple[OutputFile, ...]) -> tuple[LocalFile, ...]:
    return tuple(
        LocalFile(FileDigest(f.name, f.size, bytes.fromhex(f.sha256)), f.path) for f in items
    )


def _clean_environment(env: Mapping[str, str]) -> dict[str, str]:
    # The signed result allows simple keys and printable values of <= 200 characters.
    clean = {}
    for key, value in env.items():
        if _ENV_KEY.fullmatch(key):
            clean[key] = "".join(c if c.isprintable() else "?" for c in value)[:200]
    return clean


def _report(outcome: BuildOutcome) -> RunReport:
    environment = dict(outcome.environment)
    step = outcome.buildroot_step
    if step is not None:
        # Facts about this node's run, not part of what verification compares.
        environment["buildroot_cache"] = "hit" if step.cache_hit else "miss"
        setup = step.metadata_s + step.download_s + step.install_s
        environment["buildroot_setup_ms"] = str(int(setup * 1000))
    return RunReport(
        state=ResultState(outcome.state.value),
        exit_code=outcome.exit_status,
        environment=_clean_environment(environment),
        artifacts=_local_files(outcome.artifacts),
        logs=_local_files(outcome.logs),
        buildroot=outcome.buildroot,
    )


@attrs.frozen
class ExecutorRunner:
    """Runs jobs with the sandboxed executor. ``limits`` are the node's; a job's requested
    time limit can only lower ``limits.time_limit``. ``fetch`` is injectable for tests.
    ``buildroots`` makes the buildroots of jobs that name one (None: such jobs are refused).

    A job whose buildroot cannot be made ends without building: ``rejected``, or
    ``handed-back`` when the cause is transient (an unreachable repository), so the
    dispatcher sends it elsewhere. The signed result's environment says why
    (``reason``: ``repo-changed: ...``, ``missing-build-dependency: <name>``, ...)."""

    limits: Limits = attrs.field(factory=Limits)
    sandbox: Sandbox = attrs.field(factory=Sandbox)
    fetch: SourceFetcher = fetch_source_https
    buildroots: BuildrootCache | None = None

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        """Fetch and build ``job``. Raises the executor's and :func:`fetch_source_https`'s
        errors (all :class:`~p2pbuild.RemoteError`, or :class:`BuildEnvironmentError`)."""
        spec = job.spec
        (workdir / "source").mkdir(parents=True)
        source = workdir / "source" / spec.source.name
        await self.fetch(spec.source, source)
        options = spec.options_map
        build_spec = BuildSpec(
            build_type=spec.build_type,
            source=source,
            source_sha256=spec.source.sha256.hex(),
            with_features=options.get("with", ()),  # type: ignore[arg-type]
            without_features=options.get("without", ()),  # type: ignore[arg-type]
            check=bool(options.get("check", True)),
            jobs=int(options.get("jobs", 1)),  # type: ignore[arg-type]
            buildroot=spec.buildroot,
        )
        limits = attrs.evolve(
            self.limits, time_limit=min(self.limits.time_limit, float(spec.time_limit_s))
        )
        try:
            outcome = await run_build(
                build_spec, workdir / "run", limits, log=log, sandbox=self.sandbox,
                buildroots=self.buildroots,
            )
        except BuildrootError as exc:
            reason = str(exc) if str(exc).startswith(exc.code) else f"{exc.code}: {exc}"
            await log(f"\n[p2pbuild: no build: {reason}]\n".encode())
            return RunReport(
                state=ResultState.HANDED_BACK if exc.transient else ResultState.REJECTED,
                exit_code=None,
                environment=_clean_environment({"reason": reason}),
            )
        return _report(outcome)
