"""Identities: ed25519 keys, their printable forms, key files and domain-separated signatures.

A p2pbuild identity is an ed25519 key pair (PyNaCl). Its public half prints as
``ed25519:<43 characters of unpadded URL-safe base64>``, and as a short fingerprint of four
colon-separated hex groups taken from its SHA-256 for people comparing keys by eye.

Every signature made by p2pbuild covers ``domain || message``, where ``domain`` names the
object type (``Domain.RECORD_CAPABILITY``, ``Domain.TRUST_LIST``, ...). A signature made for
one object type therefore never verifies as another, whatever the bytes of the message.

Private key files are small TOML documents created with mode 0600; loading one that group or
others can read is refused, like OpenSSH does.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import stat
import tomllib
from pathlib import Path

import attrs
import nacl._sodium
import nacl.bindings
import nacl.exceptions
import nacl.signing
import tomli_w

from ._errors import BadSignatureError, KeyFileError, LocalError, MalformedError

__all__ = ["Domain", "Identity", "PublicKey", "Role"]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_PREFIX = "ed25519:"
# Refuse to read a "key file" larger than this: a real one is about 200 bytes.
_MAX_KEY_FILE = 4096


class Role(enum.StrEnum):
    """What a key is trusted to do; named by the trust list."""

    NODE = "node"
    DISPATCHER = "dispatcher"
    MAINTAINER = "maintainer"


class Domain(enum.Enum):
    """Domain-separation prefixes, one per signed object type. Never reuse or renumber."""

    RECORD_CAPABILITY = b"p2pbuild-v1/record/capability\x00"
    RECORD_STATUS = b"p2pbuild-v1/record/status\x00"
    TRUST_LIST = b"p2pbuild-v1/trust-list\x00"
    JOB = b"p2pbuild-v1/job\x00"
    RESULT = b"p2pbuild-v1/result\x00"
    PULL_AUTH = b"p2pbuild-v1/pull-auth\x00"
    JOB_CONTROL = b"p2pbuild-v1/job-control\x00"
    WAKE = b"p2pbuild-v1/wake\x00"
    LEASE_HOLD = b"p2pbuild-v1/lease-hold\x00"


def _check_key_bytes(instance: object, attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_SIZE:
        raise MalformedError(f"a public key is {PUBLIC_KEY_SIZE} bytes")


@attrs.frozen(order=True)
class PublicKey:
    """An ed25519 public key. Build from bytes or :meth:`from_text`; both validate length."""

    raw: bytes = attrs.field(validator=_check_key_bytes)

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse the printable form ``ed25519:<base64url>``.

        Raises :class:`MalformedError` for anything else.
        """
        if not isinstance(text, str):
            raise MalformedError("a public key is given as text")
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise MalformedError(f"a public key starts with {_PREFIX!r}")
        body = text[len(_PREFIX) :]
        if len(body) != 43:
            raise MalformedError("a public key has 43 base64 characters after the prefix")
        try:
            raw = base64.urlsafe_b64decode(body + "=")
        except (binascii.Error, ValueError):
            raise MalformedError("a public key is URL-safe base64") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
            raise MalformedError("a public key is canonical URL-safe base64")
        return cls(raw)

    @classmethod
    def _from_checked(cls, raw: bytes) -> PublicKey:
        """The key for ``raw``, which the caller already checked is exactly ``bytes`` of
        :data:`PUBLIC_KEY_SIZE`.

        For the record decoding hot path: a DHT node sees the same publishers over and over,
        so keys are kept in a small cache (keys are immutable values; nothing about a
        signature is cached), and a new one skips the attrs ``__init__`` whose validator
        would repeat the caller's check.
        """
        key = _known_keys.get(raw)
        if key is None:
            key = object.__new__(cls)
            object.__setattr__(key, "raw", raw)
            if len(_known_keys) >= _KNOWN_KEYS_LIMIT:
                _known_keys.clear()
            _known_keys[raw] = key
        return key

    def __str__(self) -> str:
        return _PREFIX + base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode()

    @property
    def fingerprint(self) -> str:
        """A short form for people: ``a1b2:c3d4:e5f6:0718`` (64 bits of SHA-256)."""
        digest = hashlib.sha256(self.raw).hexdigest()[:16]
        return ":".join(digest[i : i + 4] for i in range(0, 16, 4))

    def verify(self, domain: Domain, message: bytes, signature: bytes) -> None:
        """Check that ``signature`` signs ``message`` under ``domain`` with this key.

        Raises :class:`BadSignatureError` if it does not.
        """
        if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
            raise BadSignatureError(f"a signature is {SIGNATURE_SIZE} bytes")
        if not verify_prefixed(self.raw, domain.value + message, signature):
            raise BadSignatureError(
                f"signature does not verify for {self.fingerprint} ({domain.name.lower()})"
            )


# PublicKey._from_checked's cache; emptied when full, so it stays bounded whatever peers send.
_KNOWN_KEYS_LIMIT = 4096
_known_keys: dict[bytes, PublicKey] = {}


def verify_prefixed(key: bytes, signed: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s ed25519 signature of ``signed`` (which already
    starts with its domain prefix). ``key`` must be 32 bytes and ``signature`` 64; other
    lengths never verify.

    The one place p2pbuild checks a signature: libsodium's ``crypto_sign_open``, as
    ``VerifyKey.verify`` and ``nacl.bindings.crypto_sign_open`` call it, so the checks are
    the same (libsodium rejects non-canonical signatures and small-order keys). It is called
    through PyNaCl's own cffi library rather than the binding because on the record hot path
    the binding's wrapping costs about a microsecond: it allocates a zeroed output buffer and
    a length cell, then copies the message out again. libsodium writes neither when both
    pointers are NULL (``crypto_sign_ed25519_open`` checks them), so nothing is allocated
    but the joined ``signature || signed`` input.
    """
    if len(key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    return verify_joined(key, signature + signed)


def verify_joined(key: bytes, signed: bytes) -> bool:
    """:func:`verify_prefixed` for callers that already joined ``signature || message``
    (the record decoder builds it in one expression) and checked that ``key`` is 32 bytes
    and the signature 64."""
    status: int = _sign_open(_NULL, _NULL, signed, len(signed), key)
    return status == 0


# PyNaCl's cffi module (PyNaCl is pinned in pyproject.toml; the tests check that this path
# agrees with nacl.bindings.crypto_sign_open on valid and corrupted signatures).
_sign_open = nacl._sodium.lib.crypto_sign_open
_NULL = nacl._sodium.ffi.NULL


@attrs.frozen(repr=False)
class Identity:
    """A private key with its role. ``repr`` never shows the secret."""

    signing_key: nacl.signing.SigningKey
    role: Role

    @classmethod
    def generate(cls, role: Role) -> Identity:
        """A fresh random identity."""
        return cls(nacl.signing.SigningKey.generate(), role)

    @classmethod
    def from_seed(cls, seed: bytes, role: Role) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and throwaway networks).

        Raises :class:`LocalError` unless ``seed`` is 32 bytes.
        """
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise LocalError("a seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed), role)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(bytes(self.signing_key.verify_key))

    def sign(self, domain: Domain, message: bytes) -> bytes:
        """Sign ``domain || message``; returns the 64-byte signature."""
        signed = self.signing_key.sign(domain.value + message)
        return bytes(signed.signature)

    def __repr__(self) -> str:
        return f"Identity(role={self.role.value!r}, public_key={self.public_key})"

    # -- key files ----------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write the private key to ``path`` (mode 0600, never overwriting) and the public key
        to ``path`` + ``.pub``. Returns the public key file's path.

        Raises :class:`KeyFileError` if either file already exists or cannot be written.
        """
        pub_path = path.with_name(path.name + ".pub")
        if path.exists() or pub_path.exists():
            raise KeyFileError(f"{path} or {pub_path} already exists; not overwriting a key")
        document = {
            "role": self.role.value,
            "public": str(self.public_key),
            "secret": base64.urlsafe_b64encode(bytes(self.signing_key)).decode(),
        }
        text = (
            "# p2pbuild private key. Keep this file secret: anyone who reads it can act as\n"
            "# this identity. Share only the .pub file next to it.\n" + tomli_w.dumps(document)
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            pub_path.write_text(f"{self.public_key} {self.role.value}\n", encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"cannot write {pub_path}: {exc.strerror}") from None
        return pub_path

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Load a private key file written by :meth:`save`.

        Raises :class:`KeyFileError` if the file is missing, readable by group or others,
        too large, or not a valid key file (including a secret that does not match the
        recorded public key).
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
        except OSError as exc:  # pragma: no cover - fstat on an open fd does not fail
            os.close(fd)
            raise KeyFileError(f"cannot stat key file {path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            # Checked on the open descriptor, before fdopen (which refuses directories with
            # an IsADirectoryError of its own).
            os.close(fd)
            raise KeyFileError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if info.st_mode & 0o077:
                raise KeyFileError(
                    f"{path} is accessible by group or others (mode "
                    f"{stat.S_IMODE(info.st_mode):04o}); a private key must be readable by its "
                    f"owner only. Fix it with: chmod 600 {path}"
                )
            data = f.read(_MAX_KEY_FILE + 1)
        if len(data) > _MAX_KEY_FILE:
            raise KeyFileError(f"{path} is too large to be a key file")
        try:
            document = tomllib.loads(data.decode("utf-8"))
            role = Role(document["role"])
            secret = base64.urlsafe_b64decode(document["secret"])
            public = PublicKey.from_text(document["public"])
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError,
                binascii.Error, MalformedError) as exc:
            raise KeyFileError(f"{path} is not a p2pbuild key file ({exc})") from None
        if len(secret) != 32:
            raise KeyFileError(f"{path}: the secret is not 32 bytes")
        identity = cls.from_seed(secret, role)
        if identity.public_key != public:
            raise KeyFileError(f"{path}: the secret does not match the recorded public key")
        return identity


def load_public_key(text_or_path: str) -> PublicKey:
    """Accept a public key given as ``ed25519:...`` text or as the path of a ``.pub`` or
    private key file. Raises :class:`MalformedError` or :class:`KeyFileError`."""
    if text_or_path.startswith(_PREFIX):
        return PublicKey.from_text(text_or_path)
    path = Path(text_or_path)
    if not path.exists():
        raise KeyFileError(f"{text_or_path} is neither an ed25519:... key nor an existing file")
    if path.suffix == ".pub":
        try:
            text = path.read_text(encoding="utf-8")[:_MAX_KEY_FILE]
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read {path}: {exc}") from None
        fields = text.split()
        if not fields:
            raise KeyFileError(f"{path} is empty")
        return PublicKey.from_text(fields[0])
    return Identity.load(path).public_key
