"""Waiting in tests that run over real sockets and processes.

Wait on an event where the product has one: a service's ``wait_result`` / ``wait_idle``, a
node's live log followed to its end (:func:`follow_log`), the engine's change events
(``engine_waits``), a runner's :meth:`~p2pbuild.testing.InstantRunner.wait_runs`. What has
none is state another process keeps (the Koji hub's tasks, a child dispatcher's SQLite
store, processes in ``/proc``) or a counter with no event of its own: a test can only look
at it again, and :func:`wait_until` is the one place that does, failing with what it
waited for."""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import trio

from p2pbuild import Job, Result

T = TypeVar("T")

#: How often :func:`wait_until` looks again: short next to every timeout it is given.
POLL_S = 0.05


async def wait_until(
    condition: Callable[[], T | Awaitable[T]], timeout: float, what: str, every: float = POLL_S
) -> T:
    """The first true value of ``condition()`` (called, and awaited if it returns an
    awaitable, every ``every`` seconds). Fails the test with ``what`` after ``timeout``
    seconds."""
    with trio.move_on_after(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            await trio.sleep(every)
    raise AssertionError(f"waited {timeout:g} s in vain until {what}")


async def follow_log(client: httpx.AsyncClient, job: Job, until: bytes | None = None) -> bytes:
    """Follow a node's live log of ``job`` (``GET .../log?follow=1``, the stream the node
    closes when the job ends, as the dispatcher does) until it ends, or with ``until`` only
    until that text has arrived. Returns what was read."""
    received = b""
    path = f"/v1/jobs/{job.id_hex}/log?follow=1"
    # A quiet build may say nothing for long: the caller's deadline bounds the wait.
    async with client.stream("GET", path, timeout=httpx.Timeout(10, read=None)) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_raw():
            received += chunk
            if until is not None and until in received:
                return received
    assert until is None, f"the job ended before its log said {until!r}: {received!r}"
    return received


async def ended_result(client: httpx.AsyncClient, job: Job, timeout: float = 10) -> Result:
    """The node's signed result of ``job``, once its live log says it ended."""
    with trio.fail_after(timeout):
        await follow_log(client, job)
        response = await client.get(f"/v1/jobs/{job.id_hex}/result")
    assert response.status_code == 200, response.text
    return Result.from_bytes(response.content)


class JsonLines:
    """The JSON lines a child process writes to ``stream`` (its standard output): what it
    says when it is ready or has done something, the event to wait for."""

    def __init__(self, stream: trio.abc.ReceiveStream | None, who: str) -> None:
        assert stream is not None
        self._stream, self._who = stream, who
        self._buffer = bytearray()

    async def next(self) -> dict[str, Any]:
        """The next line, parsed. Fails the test if the child closed its output first."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            assert chunk, f"{self._who} closed its output"
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message


async def ready_line(process: trio.Process, who: str, timeout: float = 60) -> dict[str, Any]:
    """The JSON line a child process prints on its standard output once it serves (``node
    run``, ``dispatcher run``, ``dht serve``), rather than a guessed pause."""
    with trio.fail_after(timeout):
        return await JsonLines(process.stdout, who).next()
