"""Identifiers of the DHT: 160-bit node ids and keys, contacts, and key derivation.

Node ids and keys share one 160-bit space (the ``kademlia`` package's, SHA-1 sized) and are
20 bytes on the wire. Inside the core they are Python ``int`` values, because XOR distance on
ints is one operation and an int is smaller than a bytes object of the same value.

Every key p2pbuild uses is the SHA-1 of a text key (what a stock ``kademlia`` client's
``Server.get(text)`` computes too)::

    p2pbuild/node/<ed25519:... public key>      the records of one publisher
    p2pbuild/facet/<facet>                      e.g. p2pbuild/facet/arch=s390x
    p2pbuild/facet/<facet>#<s>/<S>              shard s of S (a power of two) of a big facet

SHA-1 here is a placement function, not a security primitive: what a key holds is protected
by the records' own signatures and by the store's key-binding check (see ``_store.py``).
"""

from __future__ import annotations

import hashlib
import random

import attrs

from .._errors import MalformedError
from .._identity import PublicKey

__all__ = [
    "FACET_MAX_LEVEL",
    "facet_shard",
    "facet_shard_key",
    "facet_shard_text_key",
    "ID_BITS",
    "ID_SIZE",
    "Address",
    "Contact",
    "facet_key",
    "facet_text_key",
    "id_from_bytes",
    "id_to_bytes",
    "node_id_for",
    "node_key",
    "node_text_key",
    "random_node_id",
    "text_key",
]

ID_BITS = 160
ID_SIZE = 20

#: A UDP address: ``(host, port)`` with ``host`` an IP literal.
Address = tuple[str, int]


def id_from_bytes(value: bytes) -> int:
    """The int form of a 20-byte id. Raises :class:`MalformedError` for another length."""
    if type(value) is not bytes or len(value) != ID_SIZE:
        raise MalformedError(f"an id is {ID_SIZE} bytes")
    return int.from_bytes(value, "big")


def id_to_bytes(value: int) -> bytes:
    """The 20-byte wire form of an int id."""
    return value.to_bytes(ID_SIZE, "big")


def text_key(text: str) -> bytes:
    """The DHT key of a text key: ``SHA-1(UTF-8(text))``, as ``kademlia.utils.digest``."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def node_text_key(publisher: PublicKey) -> str:
    """``p2pbuild/node/ed25519:...``: where a publisher's own records live."""
    return f"p2pbuild/node/{publisher}"


def facet_text_key(facet: str) -> str:
    """``p2pbuild/facet/<facet>`` for a facet such as ``arch=s390x`` or ``pool=kernel``."""
    return f"p2pbuild/facet/{facet}"


def node_key(publisher: PublicKey) -> bytes:
    """The DHT key holding the records of ``publisher``."""
    return text_key(node_text_key(publisher))


def facet_key(facet: str) -> bytes:
    """The DHT key of a capability facet (``Capability.facets()`` lists them)."""
    return text_key(facet_text_key(facet))


#: The deepest shard level of a facet: ``2 ** level`` shards (4,096 at most, room for
#: about 170,000 publishers at the default caps; docs/protocol.md, *Facets at scale*).
FACET_MAX_LEVEL = 12


def facet_shard(publisher: PublicKey, level: int) -> int:
    """The shard (``0 .. 2 ** level - 1``) of ``publisher`` among a facet's ``2 ** level``
    shards: the first ``level`` bits of its node key, so shards fill evenly, a publisher
    always picks the same one, and shard ``s`` of level ``l`` is the union of shards
    ``2s`` and ``2s + 1`` of level ``l + 1``."""
    if not 0 <= level <= FACET_MAX_LEVEL:
        raise MalformedError(f"shard level must be 0 to {FACET_MAX_LEVEL}, got {level}")
    return int.from_bytes(node_key(publisher)[:2], "big") >> (16 - level)


def facet_shard_text_key(facet: str, level: int, shard: int) -> str:
    """``p2pbuild/facet/<facet>#<shard>/<2 ** level>``: the name of one shard of a facet
    with many publishers (its key is :func:`facet_shard_key`, not this text's hash)."""
    return f"p2pbuild/facet/{facet}#{shard}/{1 << level}"


def facet_shard_key(facet: str, level: int, shard: int) -> bytes:
    """The DHT key of shard ``shard`` of the ``2 ** level`` shards of ``facet``: the key of
    the level, ``SHA-1("p2pbuild/facet/<facet>#/<2 ** level>")``, with its first ``level``
    bits XORed with ``shard``. The shards of a level lie in ``2 ** level`` different
    subtrees of the id space, so that no node is among the k closest nodes of two of them
    while a subtree holds k nodes or more (random keys put two shards' holders on the same
    nodes when the keys happen to lie close: such nodes served the most in
    ``bench/internet.py``'s load phase)."""
    if not 1 <= level <= FACET_MAX_LEVEL or not 0 <= shard < 1 << level:
        raise MalformedError(f"no shard {shard} at level {level}")
    base = int.from_bytes(text_key(f"p2pbuild/facet/{facet}#/{1 << level}"), "big")
    return id_to_bytes(base ^ (shard << (ID_BITS - level)))


def node_id_for(publisher: PublicKey) -> bytes:
    """The node id of a DHT node run by ``publisher``: equal to its :func:`node_key`, so the
    node itself is always the closest holder of its own records."""
    return node_key(publisher)


def random_node_id(rng: random.Random) -> bytes:
    """A node id for a node without an identity (a plain DHT server)."""
    return rng.getrandbits(ID_BITS).to_bytes(ID_SIZE, "big")


@attrs.frozen
class Contact:
    """A DHT node as others see it: its 20-byte id and its UDP address."""

    node_id: bytes
    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)
