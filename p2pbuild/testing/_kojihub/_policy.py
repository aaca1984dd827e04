"""Hub policies (``hub.conf`` ``[policy]``), as far as a build host meets them.

A policy is lines of ``test [&& test ...] :: action [reason]``, first match wins, as in
Koji's ``koji.policy`` (``SimpleRuleSet``). The tests here are the ones the build host's
policies use in practice: ``all``, ``none``, ``has_perm <perm>...`` (the user named by the
data's ``user_id``, else the caller), ``match <field> <glob>...`` and ``bool <field>``, each
negatable with ``!``. :func:`check_policy` is Koji 1.35 ``kojihub.check_policy``: an
``allow`` passes, anything else raises ``ActionNotAllowed("policy violation (<name>):
<reason>")``; no rule matching gives the default (``deny``, reason ``not covered by
policy``); a policy not configured at all is allowed (``MissingPolicyOk``, the hub's
default). :data:`DEFAULT_POLICIES` are the hub's own defaults for build tasks
(``kojixmlrpc._default_policies``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import koji

__all__ = ["DEFAULT_POLICIES", "check_policy", "parse_policy"]

#: Koji 1.35 ``kojixmlrpc._default_policies`` for what a build task is asked.
DEFAULT_POLICIES: dict[str, str] = {
    "build_rpm": "all :: allow",
    "build_from_srpm": "has_perm admin :: allow\n"
                       "all :: deny Only admin can do this via default policy",
    "build_from_repo_id": "has_perm admin :: allow\n"
                          "all :: deny Only admin can do this via default policy",
}

Test = Callable[[Mapping[str, Any], Callable[[Mapping[str, Any]], list[str]]], bool]


def _test(text: str) -> Test:
    negate = text.startswith("!")
    words = text.lstrip("!").split()
    if not words:
        raise koji.GenericError("empty policy test")
    name, args = words[0], words[1:]

    def run(data: Mapping[str, Any], perms: Callable[[Mapping[str, Any]], list[str]]) -> bool:
        if name == "all":
            result = True
        elif name == "none":
            result = False
        elif name == "has_perm":
            result = any(p in perms(data) for p in args)
        elif name == "match":
            value = data.get(args[0]) if args else None
            result = value is not None and any(fnmatch.fnmatchcase(str(value), g)
                                               for g in args[1:])
        elif name == "bool":
            result = bool(data.get(args[0])) if args else False
        else:
            raise koji.GenericError(f"policy test {name} is not supported by the test hub")
        return result != negate

    return run


def parse_policy(text: str) -> list[tuple[list[Test], str]]:
    """A ruleset: (tests, action with its reason) per line. Raises GenericError."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tests, sep, action = line.partition("::")
        if not sep or not action.strip():
            raise koji.GenericError(f"bad policy line: {line}")
        rules.append(([_test(t.strip()) for t in tests.split("&&")], action.strip()))
    return rules


def check_policy(policies: Mapping[str, str], name: str, data: Mapping[str, Any],
                 perms: Callable[[Mapping[str, Any]], list[str]],
                 default: str = "deny") -> None:
    """Raise ``ActionNotAllowed`` unless policy ``name`` allows ``data``."""
    text = policies.get(name)
    if text is None:
        return  # MissingPolicyOk (the hub's default): allowed
    action = None
    for tests, result in parse_policy(text):
        if all(test(data, perms) for test in tests):
            action = result
            break
    if action is None:
        result, reason = default, "not covered by policy"
    else:
        result, _, reason = action.partition(" ")
        result, reason = result.lower(), reason.strip()
    if result == "allow":
        return
    if result != "deny":
        reason = "error in policy"
    message = f"policy violation ({name})"
    if reason:
        message += f": {reason}"
    raise koji.ActionNotAllowed(message)
