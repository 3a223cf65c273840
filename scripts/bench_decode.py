"""Stored events back into domain events (registry.event_from_payload), µs per event: what each foreign event costs."""

from __future__ import annotations

import argparse
import sys
import timeit
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.domain import registry  # noqa: E402
from backend.domain.wallet import Wallet  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=5000, help="decodes of a wallet's history per repeat")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    now = datetime.now(UTC)
    wallet = Wallet.open(uuid.uuid4(), "owner", "USD", now)
    wallet.credit(100, "credit", now)
    wallet.debit(10, "debit", now)
    rows = []
    for event in wallet.collect_events():
        name, data = registry.payload_from_event(event)
        rows.append((name, str(event.originator_id), event.originator_version, event.timestamp.isoformat(), data))

    def decode() -> None:
        for name, originator, version, timestamp, data in rows:
            registry.event_from_payload(name, originator, version, timestamp, data,
                                        schema_version=registry.SCHEMA_VERSIONS[name])

    micros = min(timeit.repeat(decode, number=args.calls, repeat=5)) / args.calls / len(rows) * 1e6
    print(f"{micros:.1f} us per event (a wallet's opening, a credit and a debit; best of 5)")
    return {"bench": "decode", "us_per_event": round(micros, 2)}
