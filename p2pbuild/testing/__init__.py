"""Public test helpers: throwaway keys and trust lists, generated build inputs, an in-memory
network, a cluster builder, and sans-IO drivers of DHT cores. Our own tests use these; so can
yours."""

from .._cli._localfarm import FarmError, LocalFarm, NodeSpec, open_local_farm
from .._cli._packages import (
    FIXED_EPOCH,
    SourcePackage,
    hello_srpm,
    hello_tarball,
    write_srpm,
    write_tarball,
)
from .._cli._repos import (
    GREET_HEADER,
    PublishedRepo,
    greet_devel_rpm,
    publish_repository,
    write_rpm,
)
from ._cluster import CLUSTER_EPOCH, Cluster, open_cluster
from ._internet import SimulatedInternet, Swarm, SwarmNode, open_swarm
from ._keys import (
    TrustFixture,
    example_capability,
    example_status,
    make_identity,
    make_trust_list,
)
from ._network import MemoryEndpoint, MemoryNetwork, open_memory_network
from ._nodes import node_config, open_node_daemons, serve_files  # serve_files: _cli._repos
from ._packages import (
    disk_filler_tarball,
    network_probe_command,
    network_probe_srpm,
    network_probe_tarball,
    output_flood_tarball,
    sleeper_tarball,
)
from ._repos import greet_srpm
from ._runner import InstantRunner
from ._sansio import (
    HOP,
    SANSIO_EPOCH,
    SansIONetwork,
    ScriptedLookup,
    SentQuery,
    build_network,
    signed_records,
)

__all__ = [
    "CLUSTER_EPOCH",
    "Cluster",
    "FarmError",
    "LocalFarm",
    "NodeSpec",
    "open_local_farm",
    "MemoryEndpoint",
    "MemoryNetwork",
    "SimulatedInternet",
    "Swarm",
    "SwarmNode",
    "open_swarm",
    "HOP",
    "SANSIO_EPOCH",
    "SansIONetwork",
    "ScriptedLookup",
    "SentQuery",
    "build_network",
    "signed_records",
    "open_cluster",
    "open_memory_network",
    "FIXED_EPOCH",
    "GREET_HEADER",
    "PublishedRepo",
    "greet_devel_rpm",
    "greet_srpm",
    "publish_repository",
    "write_rpm",
    "SourcePackage",
    "TrustFixture",
    "disk_filler_tarball",
    "example_capability",
    "example_status",
    "hello_srpm",
    "hello_tarball",
    "make_identity",
    "make_trust_list",
    "InstantRunner",
    "node_config",
    "open_node_daemons",
    "serve_files",
    "network_probe_command",
    "network_probe_srpm",
    "network_probe_tarball",
    "output_flood_tarball",
    "sleeper_tarball",
    "write_srpm",
    "write_tarball",
]
