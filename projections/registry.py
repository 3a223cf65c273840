"""The projections Tally runs, in one place. A function, not a module-level list: every caller gets
fresh instances (the expiry process manager carries the CommandBus it issues commands through)."""

from __future__ import annotations

from collections.abc import Iterable

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.bus import CommandBus
from projections.api_keys import ApiKeys
from projections.balances import Balances
from projections.base import Projection
from projections.deposits import Deposits
from projections.expiry import Expiry
from projections.reservations import Reservations
from projections.stats import Stats


def all_projections(bus: CommandBus | None = None, *, expiry_batch_size: int = 100,
                    clock: Clock = SYSTEM_CLOCK) -> list[Projection]:
    """Every projection; with no bus, the expiry process manager only projects (never commands)."""
    return [Balances(), Reservations(), Deposits(), ApiKeys(), Stats(),
            Expiry(bus, batch_size=expiry_batch_size, clock=clock)]


def names() -> list[str]:
    return [projection.name for projection in all_projections()]


def select(wanted: Iterable[str], bus: CommandBus | None = None) -> list[Projection]:
    """The named projections, in registry order; KeyError names an unknown one."""
    wanted = list(wanted)
    found = {p.name: p for p in all_projections(bus)}
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise KeyError(f"unknown projection(s): {', '.join(unknown)}; known: {', '.join(found)}")
    return [p for name, p in found.items() if name in wanted]
