"""What the dispatcher reads out of a request body: a JSON object, and its text fields.

The API's routes (builds, leases) and the pull queue's lease renewals parse bodies through
these, so they refuse alike; each raises the caller's error class (``BadRequestError``, 400,
by default; a node's garbage is ``MalformedError``) with one line naming what was read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._errors import BadRequestError

__all__ = ["json_object", "optional_text"]


def json_object(
    raw: str | bytes, what: str, error: type[Exception] = BadRequestError
) -> dict[str, Any]:
    """``raw`` parsed as a JSON object. Raises ``error`` (``"<what> is not JSON"`` or
    ``"<what> must be a JSON object"``)."""
    try:
        value = json.loads(raw)
    except ValueError:
        raise error(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object")
    return value


def optional_text(fields: Mapping[str, Any], key: str) -> str | None:
    """A body's text field ``key``: None when absent or empty. Raises
    :class:`BadRequestError` for a value that is not text."""
    value = fields.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequestError(f"{key} must be text")
    return value
