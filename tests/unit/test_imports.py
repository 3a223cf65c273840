"""Importing any module of backend or projections opens nothing and reads no environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

PROBE = textwrap.dedent(
    """
    import importlib, os, pkgutil, socket, sys
    # Third-party dependencies may read the environment when imported; load them first.
    for dep in ("aiohttp", "aiohttp_sse", "asyncpg", "asyncpg.pool", "eventsourcing.domain",
                "eventsourcing.persistence", "orjson", "pydantic", "pydantic_settings", "hypothesis"):
        importlib.import_module(dep)

    opened = []
    class Trap(socket.socket):
        def connect(self, *args, **kwargs):
            opened.append(("connect", args))
            raise OSError("network blocked at import")
        def bind(self, *args, **kwargs):
            opened.append(("bind", args))
            raise OSError("network blocked at import")
    socket.socket = Trap
    def blocked(*args, **kwargs):
        opened.append(("create_connection", args))
        raise OSError("network blocked at import")
    socket.create_connection = blocked

    env_reads = []
    ours = tuple(os.path.join(os.getcwd(), part) for part in ("backend", "projections"))
    class WatchedEnviron(type(os.environ)):
        def __getitem__(self, key):
            # Blame the first caller outside os/collections.abc: a library's own reads
            # (pydantic checks PYDANTIC_DISABLE_PLUGINS when a model is defined) are not ours.
            frame = sys._getframe(1)
            while frame and ("os.py" in frame.f_code.co_filename or "_collections_abc" in frame.f_code.co_filename):
                frame = frame.f_back
            if frame and frame.f_code.co_filename.startswith(ours):
                env_reads.append((key, frame.f_code.co_filename))
            return super().__getitem__(key)
    watched = WatchedEnviron(os.environ._data, os.environ.encodekey, os.environ.decodekey,
                             os.environ.encodevalue, os.environ.decodevalue)
    os.environ = watched

    names = []
    for package in ("backend", "projections"):
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    print(len(names), "modules")
    if opened or env_reads:
        print("opened:", opened, "env:", env_reads)
        sys.exit(1)
    """
)


def test_importing_every_module_opens_nothing_and_reads_no_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count = int(result.stdout.split()[0])
    assert count >= 10


def test_serving_processes_freeze_what_startup_built() -> None:
    """Run in a process of its own: freezing and thresholds are process-wide."""
    code = (
        "import gc\n"
        "from backend.gc_tuning import YOUNG_THRESHOLD, tune_for_serving\n"
        "tune_for_serving()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_threshold()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
