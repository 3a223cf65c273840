"""Signed checkpoints: Ed25519 over a fixed text form of {tree_size, root_hash, timestamp}.

The signed bytes (docs/AUDIT.md shows how to check them with openssl alone) are

    tally-checkpoint-v1\\n<tree_size in decimal>\\n<root hash, 64 lowercase hex>\\n<timestamp>\\n

with the timestamp as YYYY-MM-DDTHH:MM:SS.ffffffZ (UTC). The private key is a PKCS#8 PEM file that
only this module reads (AUDIT_SIGNING_KEY_FILE), and only its owner may (refused otherwise, as by ssh);
it is never logged and never stored in the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "tally-checkpoint-v1"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
HEX64 = re.compile(r"[0-9a-f]{64}")


class SigningKeyError(Exception):
    """The key file is missing, unreadable or not an Ed25519 key (the message names the file only)."""


class CheckpointFormatError(ValueError):
    """A checkpoint document does not have the documented fields and forms."""


def signed_text(tree_size: int, root_hash: bytes, timestamp: str) -> bytes:
    return f"{FORMAT}\n{tree_size}\n{root_hash.hex()}\n{timestamp}\n".encode()


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex: names the key a checkpoint was signed with."""
    return hashlib.sha256(raw_public(public)).hexdigest()


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """A public key as PEM (SubjectPublicKeyInfo) or as 64 hex digits of the raw key."""
    text = data.strip()
    try:
        if HEX64.fullmatch(text.decode("ascii", "replace").lower()):
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        key = serialization.load_pem_public_key(text)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"not an Ed25519 public key ({exc.__class__.__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("not an Ed25519 public key")
    return key


@dataclass(frozen=True, slots=True)
class Checkpoint:
    tree_size: int
    root_hash: bytes
    timestamp: str
    key_id: str
    signature: bytes

    @property
    def text(self) -> bytes:
        return signed_text(self.tree_size, self.root_hash, self.timestamp)

    def verify(self, public: Ed25519PublicKey) -> bool:
        """The signature over `text` by `public`, and `key_id` naming `public`: key_id is not signed, and
        a report shows it as the key that signed, so a checkpoint cannot pass off another key's id."""
        if self.key_id != key_id(public):
            return False
        try:
            public.verify(self.signature, self.text)
        except InvalidSignature:
            return False
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp": self.timestamp,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_dict(cls, data: object) -> Checkpoint:
        """A checkpoint document (extra members such as `id` are ignored); every field checked for form."""
        if not isinstance(data, dict):
            raise CheckpointFormatError("a checkpoint is a JSON object")
        try:
            size, root, timestamp, kid, signature = (
                data["tree_size"], data["root_hash"], data["timestamp"], data["key_id"], data["signature"])
        except KeyError as exc:
            raise CheckpointFormatError(f"a checkpoint needs {exc.args[0]!r}") from None
        if type(size) is not int or size < 0:
            raise CheckpointFormatError("tree_size must be an integer >= 0")
        if not isinstance(root, str) or not HEX64.fullmatch(root):
            raise CheckpointFormatError("root_hash must be 64 lowercase hex digits")
        if not isinstance(timestamp, str) or not TIMESTAMP.fullmatch(timestamp):
            raise CheckpointFormatError("timestamp must be YYYY-MM-DDTHH:MM:SS.ffffffZ")
        if not isinstance(kid, str) or not HEX64.fullmatch(kid):
            raise CheckpointFormatError("key_id must be 64 lowercase hex digits")
        try:
            raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
        except binascii.Error:
            raw = b""
        if len(raw) != 64:
            raise CheckpointFormatError("signature must be 64 bytes in base64")
        return cls(size, bytes.fromhex(root), timestamp, kid, raw)


class Signer:
    """The private key, loaded once; `sign` makes a Checkpoint."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id})"

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """The key in `path`, refused (as ssh refuses one) unless only its owner may read or write the
        file: a key others can read may already be theirs, and so may every checkpoint it signs."""
        try:
            with path.open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode & 0o777
                if mode & 0o077:
                    raise SigningKeyError(f"{path} is open to group or others (mode {mode:04o}): a private key "
                                          f"must be its owner's alone; run chmod 600 {path}")
                data = file.read()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key file {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SigningKeyError(f"{path} is not an unencrypted PKCS#8 PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a key of another algorithm than Ed25519")
        return cls(key)

    @classmethod
    def configured(cls, path: Path) -> Signer:
        """from_file for the key AUDIT_SIGNING_KEY_FILE names: a refusal names the setting to fix."""
        try:
            return cls.from_file(path)
        except SigningKeyError as exc:
            raise SigningKeyError(f"AUDIT_SIGNING_KEY_FILE: {exc}") from None

    def sign(self, tree_size: int, root_hash: bytes, timestamp: str) -> Checkpoint:
        signature = self._private.sign(signed_text(tree_size, root_hash, timestamp))
        return Checkpoint(tree_size, root_hash, timestamp, self.key_id, signature)


def keygen(out: Path) -> str:
    """Write a new Ed25519 private key to `out` (PKCS#8 PEM, mode 0600, never over an existing file);
    return its key id."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, pem)
    finally:
        os.close(fd)
    return key_id(private.public_key())
