"""p2pbuild: a volunteer build farm without a central directory.

The public names of the core live here; implementation is in private modules.
"""

from ._codec import decode, encode
from ._errors import (
    BadSignatureError,
    CodecError,
    ExpiredError,
    KeyFileError,
    LifetimeError,
    LocalError,
    MalformedError,
    NotYetValidError,
    OversizeError,
    P2PBuildError,
    RecordError,
    RemoteError,
    RollbackError,
    RotationError,
    StaleSeqError,
    ThresholdError,
    TrustError,
    UnknownKindError,
    UntrustedKeyError,
)
from ._identity import Domain, Identity, PublicKey, Role, load_public_key
from ._records import (
    DEFAULT_POLICY,
    MAX_RECORD_SIZE,
    Capability,
    Kind,
    MachineType,
    RecordPolicy,
    SignedRecord,
    Status,
    decode_record,
)
from ._trust import MAX_TRUST_LIST_SIZE, TrustEntry, TrustList, accept_update

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "MAX_RECORD_SIZE",
    "MAX_TRUST_LIST_SIZE",
    "BadSignatureError",
    "Capability",
    "CodecError",
    "Domain",
    "ExpiredError",
    "Identity",
    "KeyFileError",
    "Kind",
    "LifetimeError",
    "LocalError",
    "MachineType",
    "MalformedError",
    "NotYetValidError",
    "OversizeError",
    "P2PBuildError",
    "PublicKey",
    "RecordError",
    "RecordPolicy",
    "RemoteError",
    "Role",
    "RollbackError",
    "RotationError",
    "SignedRecord",
    "StaleSeqError",
    "Status",
    "ThresholdError",
    "TrustEntry",
    "TrustError",
    "TrustList",
    "UnknownKindError",
    "UntrustedKeyError",
    "accept_update",
    "decode",
    "decode_record",
    "encode",
    "load_public_key",
]
