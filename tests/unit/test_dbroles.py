"""`db roles` without a database: which role names and passwords it takes, and what it makes of them."""

from __future__ import annotations

import pytest

from backend.dbroles import RolesError, role_name


@pytest.mark.parametrize("name", ["tally_app", "_a", "a" * 63])
def test_a_plain_role_name_is_taken_as_it_is(name: str) -> None:
    assert role_name(name) == name


@pytest.mark.parametrize("name", ["", "App", "1app", "a" * 64, "a-b", "roles_x\n", "roles_x\n\n", "\nroles_x"])
def test_anything_else_is_refused(name: str) -> None:
    with pytest.raises(RolesError, match="not a plain role name"):
        role_name(name)
