"""Fixtures for the integration tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """An empty directory for a PostgreSQL server of the test's own, outside pytest's temporary root.

    As root, the embedded server runs as another user, so the wheel opens every parent of its data
    directory to others; but each pytest session that starts closes its temporary root again
    (/tmp/pytest-of-<user>, mode 0700), so a server there breaks whenever another session starts."""
    path = Path(tempfile.mkdtemp(prefix="tally-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
