"""This build's version and, when run from a git checkout, its commit: for `--version` and /metrics."""

from __future__ import annotations

import contextlib
import subprocess
from importlib import metadata
from pathlib import Path


def version() -> str:
    try:
        return metadata.version("tally")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def git_commit() -> str | None:
    """The checkout's HEAD (12 hex digits), or None when not run from a checkout or git cannot tell."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
                               capture_output=True, text=True, timeout=5)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return None


def version_text() -> str:
    commit = git_commit()
    return version() + (f" (git {commit})" if commit else "")
