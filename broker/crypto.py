"""AES-256-GCM sealing of cached tokens.

Each value is bound to its cache key as associated data: a ciphertext copied to another key (another
tenant, say) fails to open instead of handing one tenant's token to another. A fresh random 96-bit
nonce per seal; the layout is ``version byte | nonce | ciphertext+tag``.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import CredentialLoadError, SealError

_VERSION = b"\x01"
_NONCE_BYTES = 12
KEY_BYTES = 32


def parse_key(text: str) -> bytes:
    """Decode a base64 AES-256 key, rejecting anything that is not exactly 32 bytes."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialLoadError("cache_encryption_key: not valid base64") from None
    if len(key) != KEY_BYTES:
        raise CredentialLoadError(f"cache_encryption_key: must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def new_key() -> str:
    """A new random key, base64, for ``cache_encryption_key``."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


class Sealer:
    """Seals and opens byte strings under one key, bound to associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _VERSION:
            raise SealError("sealed value has an unknown layout")
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + _NONCE_BYTES :], associated_data)
        except InvalidTag:
            raise SealError("sealed value does not open under this key and cache key") from None
