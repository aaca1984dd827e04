"""Public test helpers: throwaway keys and trust lists (and, as they land, an in-memory
network and a cluster builder). Our own tests use these; so can yours."""

from ._keys import (
    example_capability,
    example_status,
    make_identity,
    make_trust_list,
    TrustFixture,
)

__all__ = [
    "TrustFixture",
    "example_capability",
    "example_status",
    "make_identity",
    "make_trust_list",
]
