"""A client's buildroot at submission: repositories without a digest are pinned then."""

from __future__ import annotations

import hashlib

import pytest

from p2pbuild.dispatcher import BadRequestError
from p2pbuild.dispatcher._request import buildroot_from_json

REPOMD = b"<repomd>snapshot</repomd>"


async def fetch(url: str) -> bytes:
    if "down" in url:
        raise BadRequestError(f"cannot fetch {url}/repodata/repomd.xml: ConnectError")
    return REPOMD


async def test_an_unpinned_repository_is_pinned_at_submission() -> None:
    given = "ab" * 32
    spec = await buildroot_from_json({
        "repos": [{"name": "base", "url": "https://m.example/base/"},
                  {"name": "extra", "url": "https://m.example/extra/", "repomd_sha256": given}],
        "packages": ["make", "gcc", "gcc"],
    }, fetch)
    assert [r.repomd_sha256 for r in spec.repos] == [
        hashlib.sha256(REPOMD).digest(), bytes.fromhex(given)]
    assert spec.packages == ("gcc", "make") and spec.group == ""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"repos": [{"name": "x", "url": "https://down.example/"}]}, "cannot fetch"),
        ({"repos": []}, "1 to 8"),
        ({"repos": [{"name": "x", "url": "ftp://m.example/"}]}, "url"),
        ({"repos": [{"name": "x", "url": "https://m.example/", "repomd_sha256": "zz"}]},
         "buildroot repo"),
        ({"repos": [{"name": "x", "url": "https://m.example/"}], "extra": 1}, "only repos"),
        ([], "must be an object"),
    ],
)
async def test_bad_buildroots_are_refused(body: object, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        await buildroot_from_json(body, fetch)
