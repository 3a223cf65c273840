"""README.md's Configuration table lists every setting of backend/config.py, with its default, and
nothing else; ENVIRONMENT=production refuses development-only settings, naming each variable."""

from __future__ import annotations

import re

import pytest
from pydantic import SecretStr

from backend.config import ConfigError, Settings, check_environment, env_help
from tests.conftest import ROOT

README = ROOT / "README.md"
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \| (.*) \|$")


def documented() -> dict[str, tuple[str, str]]:
    """Each row of the table under `## Configuration`: variable -> (default cell, meaning)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            assert match[1] not in rows, f"README.md lists {match[1]} twice"
            rows[match[1]] = (match[2].strip(), match[3].strip())
    return rows


def default_cell(value: object) -> str:
    """How the table writes a default: `unset` for None, `empty` for an empty value, never a secret's value."""
    if value is None:
        return "unset"
    if value in ("", (), []):
        return "empty"
    if isinstance(value, SecretStr):
        return "a development value"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def expected() -> dict[str, str]:
    return {name.upper(): default_cell(field.default) for name, field in Settings.model_fields.items()}


def test_every_setting_has_a_row_with_its_default() -> None:
    rows = documented()
    missing = [f"| `{name}` | {default} | <meaning> |" for name, default in expected().items() if name not in rows]
    assert not missing, "README.md's Configuration table has no row for:\n" + "\n".join(missing)


def test_every_row_is_a_setting() -> None:
    unknown = sorted(set(documented()) - set(expected()))
    assert not unknown, f"README.md's Configuration table lists settings that backend/config.py lacks: {unknown}"


def test_every_documented_default_is_the_real_one() -> None:
    rows = documented()
    wrong = [f"{name}: README says {rows[name][0]}, backend/config.py has {default}"
             for name, default in expected().items() if name in rows and rows[name][0] != default]
    assert not wrong, "\n".join(wrong)
    assert all(meaning for _, meaning in rows.values())


def test_help_names_only_real_settings() -> None:
    named = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\b[A-Z]{4,}\b", env_help("APPLY_MIGRATIONS")))
    assert named <= set(expected()), named - set(expected())
    assert {"DATABASE_URL", "DATA_DIR", "ENVIRONMENT", "LOG_FORMAT"} <= named


def production(**values: object) -> Settings:
    base: dict[str, object] = {"environment": "production", "database_url": "postgresql://db/tally",
                               "deposit_address_secret": "x" * 32, "log_format": "json"}
    return Settings(**{**base, **values})  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "variable"), [
    ({"database_url": None}, "DATABASE_URL"),
    ({"deposit_address_secret": Settings.model_fields["deposit_address_secret"].default}, "DEPOSIT_ADDRESS_SECRET"),
    ({"log_format": "text"}, "LOG_FORMAT"),
    ({"deposit_address_secret": "x" * 31}, "DEPOSIT_ADDRESS_SECRET"),
    ({"stream_token_secret": "y" * 31}, "STREAM_TOKEN_SECRET"),
])
def test_production_refuses_development_settings(change: dict[str, object], variable: str) -> None:
    check_environment(production(), uses_database=True, serves=True)  # the complete production set starts
    with pytest.raises(ConfigError) as refused:
        check_environment(production(**change), uses_database=True, serves=True)
    assert variable in str(refused.value) and "ENVIRONMENT=production" in str(refused.value)
    check_environment(production(**change, environment="development"), uses_database=True, serves=True)


def test_production_checks_only_what_a_command_uses() -> None:
    offline = production(database_url=None, log_format="text")
    check_environment(offline, uses_database=False, serves=False)  # audit verify --export
    tool = production(log_format="text", deposit_address_secret=Settings.model_fields["deposit_address_secret"].default)
    check_environment(tool, uses_database=True, serves=False)  # projections status at an operator's terminal


def test_auto_log_format_is_json_in_production() -> None:
    assert production(log_format="auto").log_format_choice() == "json"
    assert production(log_format="auto", environment="development").log_format_choice() == "auto"
    assert production(log_format="TEXT", environment="development").log_format_choice() == "text"
