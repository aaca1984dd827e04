"""Identities: printable keys, fingerprints, domain separation and key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from core_strategies import value_or_our_error
from hypothesis import given
from hypothesis import strategies as st

from p2pbuild import (
    BadSignatureError,
    Domain,
    Identity,
    KeyFileError,
    LocalError,
    MalformedError,
    PublicKey,
    Role,
    load_public_key,
)
from p2pbuild.testing import make_identity


def test_throwaway_keys_are_deterministic() -> None:
    assert make_identity("a").public_key == make_identity("a").public_key
    assert make_identity("a").public_key != make_identity("b").public_key


@given(st.binary(min_size=32, max_size=32))
def test_public_key_text_round_trip(raw: bytes) -> None:
    key = PublicKey(raw)
    text = str(key)
    assert text.startswith("ed25519:") and len(text) == 8 + 43
    assert PublicKey.from_text(text) == key
    assert PublicKey.from_text(f"  {text}\n") == key


def test_fingerprint_is_short_and_stable() -> None:
    key = make_identity("fp").public_key
    groups = key.fingerprint.split(":")
    assert len(groups) == 4 and all(len(g) == 4 for g in groups)
    assert key.fingerprint == make_identity("fp").public_key.fingerprint
    assert key.fingerprint != make_identity("other").public_key.fingerprint


@given(st.text(max_size=80))
def test_from_text_gives_a_key_or_our_error(text: str) -> None:
    key = value_or_our_error(PublicKey.from_text, text)
    if key is not None:
        assert str(key) == text.strip()


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=",
               min_size=40, max_size=46))
def test_from_text_base64ish_gives_a_key_or_our_error(body: str) -> None:
    try:
        key = PublicKey.from_text("ed25519:" + body)
    except MalformedError:
        return
    assert str(key) == "ed25519:" + body


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ed25519:",
        "ssh-ed25519:" + "A" * 43,
        "ed25519:" + "A" * 42,
        "ed25519:" + "A" * 44,
        "ed25519:" + "A" * 42 + "B",  # non-zero padding bits: not the canonical form
        "ed25519:" + "+" * 43,  # standard, not URL-safe, base64
        "ed25519:" + "é" * 43,
    ],
)
def test_from_text_rejects(text: str) -> None:
    with pytest.raises(MalformedError):
        PublicKey.from_text(text)


def test_from_text_rejects_non_text() -> None:
    with pytest.raises(MalformedError):
        PublicKey.from_text(b"ed25519:" + b"A" * 43)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_public_key_length_is_checked(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        PublicKey(raw)


def test_sign_and_verify_with_domain_separation() -> None:
    identity = make_identity("signer")
    key = identity.public_key
    message = b"some bytes"
    for domain in Domain:
        signature = identity.sign(domain, message)
        key.verify(domain, message, signature)
        for other in Domain:
            if other is not domain:
                with pytest.raises(BadSignatureError):
                    key.verify(other, message, signature)
    signature = identity.sign(Domain.JOB, message)
    with pytest.raises(BadSignatureError):
        key.verify(Domain.JOB, message + b"!", signature)
    with pytest.raises(BadSignatureError):
        make_identity("someone else").public_key.verify(Domain.JOB, message, signature)
    with pytest.raises(BadSignatureError):
        key.verify(Domain.JOB, message, signature[:-1])


def test_domains_are_prefix_free() -> None:
    # No prefix is a prefix of another, so domain || message can never be ambiguous.
    prefixes = [d.value for d in Domain]
    assert len(set(prefixes)) == len(prefixes)
    for a in prefixes:
        assert a.endswith(b"\x00")
        for b in prefixes:
            if a != b:
                assert not b.startswith(a)


def test_from_seed_checks_the_seed() -> None:
    with pytest.raises(LocalError):
        Identity.from_seed(b"short", Role.NODE)


def test_repr_never_shows_the_secret() -> None:
    identity = make_identity("secret")
    assert bytes(identity.signing_key).hex() not in repr(identity)
    assert str(identity.public_key) in repr(identity)


# -- key files --------------------------------------------------------------------------------


def test_save_creates_0600_and_load_round_trips(tmp_path: Path) -> None:
    identity = make_identity("file", Role.DISPATCHER)
    path = tmp_path / "dispatcher.key"
    pub_path = identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pub_path == tmp_path / "dispatcher.key.pub"
    loaded = Identity.load(path)
    assert loaded.public_key == identity.public_key
    assert loaded.role is Role.DISPATCHER
    assert load_public_key(str(pub_path)) == identity.public_key
    assert load_public_key(str(path)) == identity.public_key
    assert load_public_key(str(identity.public_key)) == identity.public_key


def test_save_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_identity("umask").save(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    make_identity("one").save(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        make_identity("two").save(path)
    assert path.read_bytes() == before
    # Nor when only the .pub file is in the way.
    (tmp_path / "other.key.pub").write_text("x")
    with pytest.raises(KeyFileError):
        make_identity("two").save(tmp_path / "other.key")
    assert not (tmp_path / "other.key").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o620])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    make_identity("perm").save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        Identity.load(path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    path.chmod(0o600)
    Identity.load(path)
    path.chmod(0o400)
    Identity.load(path)


def test_load_rejects_a_secret_that_does_not_match_its_public_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    make_identity("mine").save(path)
    text = path.read_text()
    other = str(make_identity("theirs").public_key)
    mine = str(make_identity("mine").public_key)
    path.write_text(text.replace(mine, other))
    with pytest.raises(KeyFileError, match="does not match"):
        Identity.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not toml [",
        'role = "node"\n',
        'role = "king"\npublic = "x"\nsecret = "AAAA"\n',
        'role = "node"\npublic = "ed25519:abc"\nsecret = "AAAA"\n',
        'role = 5\npublic = 5\nsecret = 5\n',
        "\xff",
        "x" * 5000,
    ],
)
def test_load_rejects_malformed_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_load_rejects_a_short_secret(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    identity = make_identity("short")
    identity.save(path)
    text = path.read_text()
    secret_line = next(line for line in text.splitlines() if line.startswith("secret"))
    path.write_text(text.replace(secret_line, 'secret = "AAAA"'))
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_load_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path / "absent.key")
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(directory)
    with pytest.raises(KeyFileError):
        load_public_key(str(tmp_path / "absent"))


# -- the verification call agrees with PyNaCl's own ----------------------------------------------

_SMALL_ORDER_KEY = bytes(32)  # the identity point, refused by libsodium


@given(st.binary(max_size=300), st.integers(0, 95), st.integers(1, 255), st.booleans())
def test_verify_prefixed_agrees_with_pynacl(
    message: bytes, position: int, flip: int, other_key: bool
) -> None:
    import nacl.bindings
    import nacl.exceptions

    from p2pbuild._identity import verify_prefixed

    signer = make_identity("verify-agrees")
    key = (make_identity("other") if other_key else signer).public_key.raw
    signed = Domain.RECORD_STATUS.value + message
    signature = signer.sign(Domain.RECORD_STATUS, message)
    corrupted = bytearray(signature + signed)
    if position < len(corrupted):
        corrupted[position] ^= flip
    for sig, msg in ((signature, signed), (bytes(corrupted[:64]), bytes(corrupted[64:]))):
        for candidate in (key, _SMALL_ORDER_KEY):
            try:
                nacl.bindings.crypto_sign_open(sig + msg, candidate)
            except nacl.exceptions.BadSignatureError:
                expected = False
            else:
                expected = True
            assert verify_prefixed(candidate, msg, sig) is expected
    # Wrong lengths never verify (and never reach libsodium).
    assert not verify_prefixed(key[:31], signed, signature)
    assert not verify_prefixed(key, signed, signature[:63])
