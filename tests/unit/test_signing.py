"""Checkpoint documents and keys: the signed text, strict parsing of every field, keys as PEM or hex."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from backend.audit.signing import (
    Checkpoint,
    CheckpointFormatError,
    Signer,
    SigningKeyError,
    keygen,
    load_public_key,
    public_pem,
    raw_public,
    signed_text,
)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    keygen(tmp_path / "key.pem")
    return Signer.from_file(tmp_path / "key.pem")


def test_the_signed_text_and_a_round_trip(signer: Signer) -> None:
    root = bytes(range(32))
    assert signed_text(12, root, "2026-01-02T03:04:05.000006Z") == (
        b"tally-checkpoint-v1\n12\n" + root.hex().encode() + b"\n2026-01-02T03:04:05.000006Z\n")
    checkpoint = signer.sign(12, root, "2026-01-02T03:04:05.000006Z")
    again = Checkpoint.from_dict({**checkpoint.as_dict(), "id": 7, "public_key": "ignored"})
    assert again == checkpoint and again.verify(signer.public)
    assert load_public_key(public_pem(signer.public).encode()).public_bytes_raw() == raw_public(signer.public)
    assert load_public_key(raw_public(signer.public).hex().encode()).public_bytes_raw() == raw_public(signer.public)
    assert "PRIVATE" not in repr(signer) and signer.key_id in repr(signer)


def test_a_key_id_that_does_not_name_the_checking_key_fails(signer: Signer, tmp_path: Path) -> None:
    keygen(tmp_path / "other.pem")
    other = Signer.from_file(tmp_path / "other.pem")
    checkpoint = other.sign(12, bytes(32), "2026-01-02T03:04:05.000006Z")
    assert checkpoint.verify(other.public)
    passed_off = Checkpoint.from_dict({**checkpoint.as_dict(), "key_id": signer.key_id})
    assert not passed_off.verify(other.public), "valid bytes, but the key_id names another key"


@pytest.mark.parametrize(("change", "message"), [
    ({"tree_size": -1}, "tree_size"),
    ({"tree_size": "12"}, "tree_size"),
    ({"tree_size": True}, "tree_size"),
    ({"root_hash": "AB" * 32}, "root_hash"),
    ({"root_hash": "ab" * 31}, "root_hash"),
    ({"timestamp": "2026-01-02T03:04:05Z"}, "timestamp"),
    ({"key_id": None}, "key_id"),
    ({"signature": "not base64!"}, "signature"),
    ({"signature": base64.b64encode(bytes(63)).decode()}, "signature"),
])
def test_a_malformed_checkpoint_is_refused(signer: Signer, change: dict[str, object], message: str) -> None:
    document = {**signer.sign(1, bytes(32), "2026-01-02T03:04:05.000006Z").as_dict(), **change}
    with pytest.raises(CheckpointFormatError, match=message):
        Checkpoint.from_dict(document)
    with pytest.raises(CheckpointFormatError, match="needs 'signature'"):
        Checkpoint.from_dict({k: v for k, v in document.items() if k != "signature"})
    with pytest.raises(CheckpointFormatError):
        Checkpoint.from_dict([document])


def test_bad_keys_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read"):
        Signer.from_file(tmp_path / "missing.pem")
    rsa_like = tmp_path / "other.pem"
    rsa_like.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    rsa_like.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an unencrypted PKCS#8 PEM"):
        Signer.from_file(rsa_like)
    for garbage in (b"", b"zz" * 32, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"):
        with pytest.raises(SigningKeyError):
            load_public_key(garbage)
    keygen(tmp_path / "key.pem")
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "key.pem")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """As ssh refuses such a private key: one line naming the setting, the mode and the fix."""
    path = tmp_path / "key.pem"
    keygen(path)
    path.chmod(mode)
    with pytest.raises(SigningKeyError) as refused:
        Signer.configured(path)
    message = str(refused.value)
    assert message == (f"AUDIT_SIGNING_KEY_FILE: {path} is open to group or others (mode {mode:04o}): a private key "
                       f"must be its owner's alone; run chmod 600 {path}")
    path.chmod(0o400)
    assert Signer.configured(path).key_id == Signer.from_file(path).key_id
