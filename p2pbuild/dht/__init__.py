"""The p2pbuild directory: a Kademlia DHT of signed node records (design items 4 and 5).

Layers, one way (see ``docs/protocol.md`` for the wire protocol):

* :class:`DhtNode` -- the sans-IO core: routing table, lookups as state machines, record
  store; datagrams and ``now`` in, datagrams out. No trio, no clock.
* :class:`Driver` with a :class:`DatagramTransport` (:class:`UdpTransport`, or
  ``p2pbuild.testing.MemoryNetwork``) -- the thin trio adapter.
* :class:`Directory` -- ``publish`` / ``get`` / ``find`` for the node daemon, the
  dispatcher and the CLI; opened with :func:`open_directory` (UDP),
  :func:`open_directory_on` (any transport) or run with :func:`serve`.

Typical use::

    async with open_directory("0.0.0.0", 7420, bootstrap=[("seed.example", 7420)]) as d:
        await d.publish([capability_record, status_record])
        entries = await d.find(Query(arch="s390x"), trust_list=trust)

Keys: :func:`node_key` (``SHA-1("p2pbuild/node/<ed25519:...>")``) holds a publisher's own
records, :func:`facet_key` (``SHA-1("p2pbuild/facet/arch=s390x")``) the index entries.
A stock ``kademlia`` client reading ``Server.get("p2pbuild/facet/arch=s390x")`` receives a
record bundle (:func:`decode_bundle`).
"""

from ._directory import (
    Directory,
    DirectoryOptions,
    FacetSample,
    FindResult,
    NodeEntry,
    Query,
    open_directory,
    open_directory_on,
    serve,
)
from ._ids import (
    FACET_MAX_LEVEL,
    ID_SIZE,
    Address,
    Contact,
    facet_key,
    facet_shard,
    facet_shard_key,
    facet_shard_text_key,
    facet_text_key,
    node_id_for,
    node_key,
    node_text_key,
    random_node_id,
    text_key,
)
from ._protocol import (
    BootstrapOperation,
    DhtConfig,
    DhtNode,
    DhtStatistics,
    FindNodesOperation,
    GetOperation,
    Operation,
    PutOperation,
    UnexpectedResponseError,
    UnknownMethodError,
)
from ._store import (
    SHARED_CACHE,
    RecordCache,
    RecordStore,
    StoreFullError,
    WrongKeyError,
    latest,
)
from ._trio import DatagramTransport, DirectoryClosedError, Driver, PushTransport, UdpTransport
from ._wire import decode_bundle, encode_bundle

__all__ = [
    "FACET_MAX_LEVEL",
    "ID_SIZE",
    "SHARED_CACHE",
    "Address",
    "BootstrapOperation",
    "Contact",
    "DatagramTransport",
    "DhtConfig",
    "DhtNode",
    "DhtStatistics",
    "Directory",
    "DirectoryClosedError",
    "DirectoryOptions",
    "FacetSample",
    "FindResult",
    "Driver",
    "FindNodesOperation",
    "GetOperation",
    "NodeEntry",
    "Operation",
    "PushTransport",
    "PutOperation",
    "Query",
    "RecordCache",
    "RecordStore",
    "StoreFullError",
    "UdpTransport",
    "UnexpectedResponseError",
    "UnknownMethodError",
    "WrongKeyError",
    "decode_bundle",
    "encode_bundle",
    "facet_key",
    "facet_shard",
    "facet_shard_key",
    "facet_shard_text_key",
    "facet_text_key",
    "latest",
    "node_id_for",
    "node_key",
    "node_text_key",
    "open_directory",
    "open_directory_on",
    "random_node_id",
    "serve",
    "text_key",
]
