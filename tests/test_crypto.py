"""AES-GCM sealing: round trips, and refuses wrong keys, other cache keys and tampering."""

from __future__ import annotations

import base64

import pytest

from broker.crypto import Sealer, new_key, parse_key
from broker.errors import CredentialLoadError, SealError


def test_round_trip_and_binding_to_associated_data() -> None:
    """A value opens only under the cache key it was sealed for."""
    sealer = Sealer(parse_key(new_key()))
    sealed = sealer.seal(b"token-bytes", b"tb:v1:tok:a:tenant-1:r")
    assert b"token-bytes" == sealer.open(sealed, b"tb:v1:tok:a:tenant-1:r")
    assert b"token-bytes" not in sealed
    with pytest.raises(SealError):
        sealer.open(sealed, b"tb:v1:tok:a:tenant-2:r")


def test_wrong_key_and_tampering_fail() -> None:
    """Another key, a flipped bit or a truncated blob never yields plaintext."""
    sealed = Sealer(parse_key(new_key())).seal(b"x", b"k")
    with pytest.raises(SealError):
        Sealer(parse_key(new_key())).open(sealed, b"k")
    sealer = Sealer(parse_key(new_key()))
    flipped = bytearray(sealer.seal(b"x", b"k"))
    flipped[-1] ^= 1
    with pytest.raises(SealError):
        sealer.open(bytes(flipped), b"k")
    with pytest.raises(SealError):
        sealer.open(b"\x01short", b"k")


def test_parse_key_requires_32_bytes_of_base64() -> None:
    """Keys of the wrong size or encoding are rejected with a message naming the setting."""
    with pytest.raises(CredentialLoadError, match="cache_encryption_key"):
        parse_key(base64.b64encode(b"0" * 16).decode())
    with pytest.raises(CredentialLoadError, match="not valid base64"):
        parse_key("***")
