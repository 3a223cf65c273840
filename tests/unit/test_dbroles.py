"""`db roles` without a database: which role names and passwords it takes, and what it makes of them."""

from __future__ import annotations

import pytest

from backend.dbroles import RolesError, role_name, saslprep, scram_verifier


@pytest.mark.parametrize("name", ["tally_app", "_a", "a" * 63])
def test_a_plain_role_name_is_taken_as_it_is(name: str) -> None:
    assert role_name(name) == name


@pytest.mark.parametrize("name", ["", "App", "1app", "a" * 64, "a-b", "roles_x\n", "roles_x\n\n", "\nroles_x"])
def test_anything_else_is_refused(name: str) -> None:
    with pytest.raises(RolesError, match="not a plain role name"):
        role_name(name)


@pytest.mark.parametrize("password", [b"pencil", b"tab\tand\x01control", b"pen\xffcil", b"\xc2", b"\xed\xa0\x80"],
                         ids=["ascii", "ascii controls", "not utf-8", "cut short", "a surrogate"])
def test_ascii_and_what_is_not_utf_8_are_hashed_as_they_are(password: bytes) -> None:
    assert saslprep(password) == password


def test_a_password_of_bytes_that_are_not_utf_8_gets_a_verifier_of_those_bytes() -> None:
    """os.environ hands such bytes over as lone surrogates (surrogateescape); libpq sends the bytes."""
    from_environment = b"pen\xffcil".decode("utf-8", "surrogateescape")
    assert scram_verifier(from_environment, b"salt" * 4) != scram_verifier("pen\ufffdcil", b"salt" * 4)
