"""Public test helpers: throwaway keys and trust lists, an in-memory network and a cluster
builder, and generated build inputs. Our own tests use these; so can yours."""

from ._cluster import CLUSTER_EPOCH, Cluster, open_cluster
from ._keys import (
    TrustFixture,
    example_capability,
    example_status,
    make_identity,
    make_trust_list,
)
from ._network import MemoryEndpoint, MemoryNetwork, open_memory_network
from ._packages import (
    FIXED_EPOCH,
    SourcePackage,
    disk_filler_tarball,
    hello_srpm,
    hello_tarball,
    network_probe_command,
    network_probe_srpm,
    network_probe_tarball,
    output_flood_tarball,
    sleeper_tarball,
    write_srpm,
    write_tarball,
)

__all__ = [
    "CLUSTER_EPOCH",
    "FIXED_EPOCH",
    "Cluster",
    "MemoryEndpoint",
    "MemoryNetwork",
    "SourcePackage",
    "TrustFixture",
    "disk_filler_tarball",
    "example_capability",
    "example_status",
    "hello_srpm",
    "hello_tarball",
    "make_identity",
    "make_trust_list",
    "network_probe_command",
    "network_probe_srpm",
    "network_probe_tarball",
    "open_cluster",
    "open_memory_network",
    "output_flood_tarball",
    "sleeper_tarball",
    "write_srpm",
    "write_tarball",
]
