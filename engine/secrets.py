"""Secrets at rest: AES-GCM with a key from PGSINK_SECRET_KEY.

Ciphertext layout: 1 version byte, 12-byte nonce, AES-GCM ciphertext+tag.
The key is 32 random bytes, urlsafe-base64 encoded (`pgsink keygen`).
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SecretError

SECRET_KEY_ENV = "PGSINK_SECRET_KEY"
_VERSION = b"\x01"


def generate_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _key(key: str | None = None) -> bytes:
    text = key if key is not None else os.environ.get(SECRET_KEY_ENV)
    if not text:
        raise SecretError(
            f"{SECRET_KEY_ENV} is not set; it encrypts passwords and encrypted headers. "
            f"Generate one with `pgsink keygen` and export {SECRET_KEY_ENV}=<key> "
            "for every pgsink process."
        )
    try:
        raw = base64.urlsafe_b64decode(text.encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SecretError(f"{SECRET_KEY_ENV} is not a key made by `pgsink keygen` (want 32 bytes, base64).")
    return raw


def encrypt(plaintext: bytes, key: str | None = None) -> bytes:
    nonce = os.urandom(12)
    return _VERSION + nonce + AESGCM(_key(key)).encrypt(nonce, plaintext, None)


def decrypt(blob: bytes, key: str | None = None) -> bytes:
    if not blob or blob[:1] != _VERSION:
        raise SecretError("Encrypted value has an unknown format.")
    try:
        return AESGCM(_key(key)).decrypt(blob[1:13], blob[13:], None)
    except InvalidTag:
        raise SecretError(
            f"Cannot decrypt a stored secret: {SECRET_KEY_ENV} is not the key it was "
            "encrypted with. Use the original key."
        ) from None
