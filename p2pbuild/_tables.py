"""The one way p2pbuild reads a value out of a table of a configuration file (parsed TOML).

The node's, the dispatcher's and the Koji host's files take their values through
:func:`table_value`, so all refuse the same things alike: a required key that is missing,
a value of another kind (``true`` is not an integer; an integer is taken where a number is
wanted), each in one line saying what was wanted and what came. Where the key is, each
file says in its own words: ``fail(key, problem)`` returns the caller's own error (a
``LocalError`` of its subsystem) naming the file and the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["KIND_WORDS", "REQUIRED", "Fail", "shown", "table_value"]

#: ``fail(key, problem)``: the caller's error for ``problem`` (``"is required"``,
#: ``"must be an integer, got 'x'"``) with ``key`` and its table named.
Fail = Callable[[str, str], Exception]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a key that must be given.
REQUIRED: Final[Any] = _Required()

#: What a value of each kind is called in an error message.
KIND_WORDS: Final = {
    int: "an integer",
    float: "a number",
    str: "text (a quoted string)",
    list: "a list",
    dict: "a table",
    bool: "true or false",
}


def shown(value: object) -> str:
    """``value`` as an error message shows what came: its repr, at most 60 characters."""
    return f"{value!r:.60}"


def table_value(
    table: Mapping[str, Any],
    key: str,
    kind: type,
    fail: Fail,
    default: Any = REQUIRED,
    *,
    words: str = "",
) -> Any:
    """``table[key]`` checked to be a ``kind`` (an int is taken, as a float, for a float;
    a bool is never taken for a number), or ``default`` when the key is absent.

    Raises ``fail(key, "is required")`` for an absent key whose default is
    :data:`REQUIRED`, and ``fail(key, "must be <words>, got <value>")`` for a value of
    another kind (``words`` defaults to :data:`KIND_WORDS`' name of ``kind``).
    """
    if key not in table:
        if default is REQUIRED:
            raise fail(key, "is required")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        what = words or KIND_WORDS.get(kind, kind.__name__)
        raise fail(key, f"must be {what}, got {shown(value)}")
    return value
