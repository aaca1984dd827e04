import hashlib
import os

import pytest
import trio
from hypothesis import settings

# "ci" runs every property test a few hundred times; "long" is the fuzzing mode
# (HYPOTHESIS_PROFILE=long) that feeds 100,000 inputs to each decoder.
settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _scheduling_seed(request: pytest.FixtureRequest) -> None:
    """Seed trio's scheduler from the test's id, so that earlier tests do not change how
    a test's tasks are scheduled.

    Trio runs a batch of ready tasks in an order drawn from one module-level
    ``random.Random`` (shuffled, since hypothesis is imported here). Unseeded, a cluster
    test's outcome hung on whatever earlier tests had drawn from it: a test could pass
    alone and fail after others. Trio offers no public way to seed it. What this does
    not fix: trio breaks ties between equal deadlines by the cancel scopes' ``id()``
    (memory addresses), so a cluster test on the virtual clock can still run a little
    differently after other tests; its assertions must hold either way.
    """
    seed = hashlib.sha256(request.node.nodeid.encode()).digest()
    trio._core._run._r.seed(seed)
