"""The repository explains itself: no tracked file cites a design document that lives outside it."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

# A citation of the out-of-tree design notes, or of anything beside the checkout (the shared folder).
# Spelt from its parts, so that this file does not itself read as such a citation.
NAME, FOLDER = "DESIGN", "shared"
OUTSIDE = re.compile(rf"{NAME}\.md|\.\./{FOLDER}\b|(?<![\w.]){FOLDER}/{NAME}")


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [name for name in listed.stdout.splitlines()
            if name.endswith((".py", ".md", ".sql", ".cfg", ".toml", ".sh", ".lua", ".json", ".yml"))
            or name.startswith("scripts/")]


def test_no_file_cites_a_document_outside_the_repository() -> None:
    offenders = []
    for name in tracked_text_files():
        path = ROOT / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "files cite a document outside the repository:\n" + "\n".join(offenders)
