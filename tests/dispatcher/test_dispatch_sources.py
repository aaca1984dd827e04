"""The source URL policy: which addresses a source may come from, with an injected resolver."""

from __future__ import annotations

import pytest

from p2pbuild.dispatcher._errors import SourceUnavailableError
from p2pbuild.dispatcher._sources import address_allowed, check_source_url


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "fe80::1", "fc00::1", "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "192.0.2.1", "not an address",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(address)


async def test_a_host_is_refused_if_any_of_its_addresses_is_not_public() -> None:
    answers = {"mixed.example": ["8.8.8.8", "10.0.0.1"], "public.example": ["8.8.8.8"],
               "inside.example": ["192.168.0.5"]}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    assert await check_source_url("https://public.example/x", (), resolve) is False
    for url in ("https://mixed.example/x", "http://inside.example:8080/x"):
        with pytest.raises(SourceUnavailableError, match="not a public address"):
            await check_source_url(url, (), resolve)
    # The allow-list names hosts whose addresses are not checked at all.
    assert await check_source_url("http://inside.example:8080/x", ("inside.example",),
                                  resolve) is True
    with pytest.raises(SourceUnavailableError, match=r"^cannot fetch the source from nx\.example$"):
        await check_source_url("https://nx.example/x", (), resolve)
    for url in ("ftp://public.example/x", "https:///x", "https://public.example:99999/x"):
        with pytest.raises(SourceUnavailableError):
            await check_source_url(url, (), resolve)
