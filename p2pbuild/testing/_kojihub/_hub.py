"""The test hub: every layer of methods, and the ``testhub.*`` controls.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._cg import ContentGeneratorMethods


@attrs.define(eq=False)
class KojiTestHub(ContentGeneratorMethods):
    """The hub over ``data_dir`` (``_core.HubCore``), with every method."""

    # -- test controls --------------------------------------------------------------------------

    def _test_control(self, method: str, params: list[Any]) -> Any:
        name = method.split(".", 1)[1]
        if name == "expireSessions":
            self._expire_all()
            self._save()
            return True
        if name == "expireOn":
            self._expire_on.add(params[0])
            return True
        if name == "crashOn":
            self._crash_on.add(params[0])
            return True
        if name == "setOffline":
            self._offline = bool(params[0])
            return True
        if name == "taskRefusals":
            return list(self._task(params[0])["refusals"].values())
        if name == "calls":
            return [dict(c) for c in self.calls]
        if name == "state":
            return json.dumps(self._state)
        raise koji.GenericError(f"Invalid method: {method}")

