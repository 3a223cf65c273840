"""A seeded random command workload through the real CommandBus: wallets, credits, debits, locks,
settlements, reservations (some with a 1 s TTL), deposits through their statuses, API keys."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID, uuid4

from backend.commands import api_keys, deposits, wallets
from backend.commands.bus import CommandBus, Decision
from backend.commands.context import SYSTEM, CommandContext
from backend.commands.errors import CommandError
from backend.domain.errors import DomainError
from backend.domain.registry import apikey_stream, deposit_stream, wallet_stream

OWNERS = ("alice", "bob", "carol")
CURRENCIES = ("USD", "EUR", "BTC")
SECRET = b"a test secret for deposit addresses"


@dataclass
class World:
    """What the workload knows exists, to pick sensible (and some doomed) commands."""

    wallets: list[tuple[UUID, str]] = field(default_factory=list)
    locks: list[tuple[UUID, UUID]] = field(default_factory=list)
    reservations: list[tuple[UUID, UUID]] = field(default_factory=list)
    deposits: list[tuple[UUID, UUID, str]] = field(default_factory=list)
    keys: list[UUID] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0


class Workload:
    def __init__(self, bus: CommandBus, seed: int) -> None:
        self.bus = bus
        self.repo = bus.repository
        self.rng = random.Random(seed)
        self.world = World()

    async def run(self, commands: int, *, clients: int = 4) -> World:
        remaining = [commands]

        async def client() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await self.step()

        await asyncio.gather(*(client() for _ in range(clients)))
        return self.world

    async def step(self) -> None:
        w = self.world
        choices: list[tuple[int, Callable[[], Awaitable[None]]]] = [(3 if len(w.wallets) < 6 else 1, self.open_wallet)]
        if w.wallets:
            choices += [(6, self.credit), (4, self.debit), (3, self.lock), (3, self.reserve), (2, self.open_deposit),
                        (1, self.create_key)]
        if w.locks:
            choices += [(2, self.release), (2, self.settle)]
        if w.reservations:
            choices += [(2, self.confirm), (2, self.rollback), (1, self.expire)]
        if w.deposits:
            choices += [(3, self.deposit_status)]
        if w.keys:
            choices += [(1, self.revoke_key)]
        weights = [c[0] for c in choices]
        await self.rng.choices([c[1] for c in choices], weights)[0]()

    async def execute(self, streams: list[str], decide: Callable[[CommandContext], Awaitable[Decision]]) -> bool:
        try:
            await self.bus.execute(CommandContext(SYSTEM), streams, decide)
        except (DomainError, CommandError):
            self.world.rejected += 1
            return False
        self.world.accepted += 1
        return True

    def wallet(self) -> tuple[UUID, str]:
        return self.rng.choice(self.world.wallets)

    # ------------------------------------------------------------------ wallets

    async def open_wallet(self) -> None:
        wallet_id, owner, currency = uuid4(), self.rng.choice(OWNERS), self.rng.choice(CURRENCIES)
        if await self.execute([wallet_stream(wallet_id)],
                              lambda ctx: wallets.open_wallet(self.repo, ctx, wallet_id, owner, currency)):
            self.world.wallets.append((wallet_id, currency))

    async def credit(self) -> None:
        wallet_id, _ = self.wallet()
        amount = self.rng.randint(1, 10_000)
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.credit(self.repo, ctx, wallet_id, amount, "top-up", None))

    async def debit(self) -> None:
        wallet_id, _ = self.wallet()
        amount = self.rng.randint(1, 5_000)
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.debit(self.repo, ctx, wallet_id, amount, "order", None))

    async def lock(self) -> None:
        wallet_id, _ = self.wallet()
        lock_id, amount = uuid4(), self.rng.randint(1, 3_000)
        if await self.execute([wallet_stream(wallet_id)],
                              lambda ctx: wallets.lock(self.repo, ctx, wallet_id, lock_id, amount, "escrow", None)):
            self.world.locks.append((wallet_id, lock_id))

    async def release(self) -> None:
        wallet_id, lock_id = self.world.locks.pop(self.rng.randrange(len(self.world.locks)))
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.release(self.repo, ctx, wallet_id, lock_id, None))

    async def settle(self) -> None:
        wallet_id, lock_id = self.world.locks.pop(self.rng.randrange(len(self.world.locks)))
        to_wallet, _ = self.wallet()  # another currency or the same wallet: rejected, and that is fine
        await self.execute([wallet_stream(wallet_id), wallet_stream(to_wallet)],
                           lambda ctx: wallets.settle(self.repo, ctx, wallet_id, lock_id, to_wallet, None))

    async def reserve(self) -> None:
        wallet_id, _ = self.wallet()
        reservation_id, amount = uuid4(), self.rng.randint(1, 3_000)
        ttl = self.rng.choice((1, 1, 3600))
        if await self.execute([wallet_stream(wallet_id)], lambda ctx: wallets.reserve(
                self.repo, ctx, wallet_id, amount, ttl, None, reservation_id)):
            self.world.reservations.append((wallet_id, reservation_id))

    def reservation(self) -> tuple[UUID, UUID]:
        return self.world.reservations.pop(self.rng.randrange(len(self.world.reservations)))

    async def confirm(self) -> None:
        wallet_id, reservation_id = self.reservation()
        amount = self.rng.choice((None, 1))
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.confirm(self.repo, ctx, wallet_id, reservation_id, amount, None))

    async def rollback(self) -> None:
        wallet_id, reservation_id = self.reservation()
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.rollback(self.repo, ctx, wallet_id, reservation_id, None))

    async def expire(self) -> None:
        wallet_id, reservation_id = self.rng.choice(self.world.reservations)
        await self.execute([wallet_stream(wallet_id)],
                           lambda ctx: wallets.expire(self.repo, ctx, wallet_id, reservation_id))

    # ------------------------------------------------------------------ deposits and keys

    async def open_deposit(self) -> None:
        wallet_id, currency = self.wallet()
        deposit_id = uuid4()
        if await self.execute([deposit_stream(deposit_id)], lambda ctx: deposits.open_deposit(
                self.repo, ctx, deposit_id, wallet_id, currency, SECRET)):
            self.world.deposits.append((deposit_id, wallet_id, currency))

    async def deposit_status(self) -> None:
        deposit_id, wallet_id, currency = self.rng.choice(self.world.deposits)
        status = self.rng.choice(("confirming", "confirming", "pending", "confirmed", "confirmed", "failed", "expired"))
        confirmations = self.rng.randint(0, 12)
        confirmed = status == "confirmed"
        tx = f"tx-{uuid4().hex}" if confirmed else None
        streams = [deposit_stream(deposit_id), wallet_stream(wallet_id)]
        if tx is not None:
            streams.append(deposits.chain_tx_stream(currency, tx))
        await self.execute(streams, lambda ctx: deposits.set_status(
            self.repo, ctx, deposit_id, status, confirmations=confirmations,
            amount=self.rng.randint(1, 50_000) if confirmed else None, chain_tx_id=tx,
            reason="bounced" if status == "failed" else None))

    async def create_key(self) -> None:
        key_id, token = api_keys.new_token()
        owner = self.rng.choice(OWNERS)
        scopes = self.rng.choice((["wallets:read"], ["wallets:read", "wallets:write"], ["admin"]))
        if await self.execute([apikey_stream(key_id)], lambda ctx: api_keys.create_key(
                self.repo, ctx, key_id, token, owner, f"key of {owner}", scopes, None)):
            self.world.keys.append(key_id)

    async def revoke_key(self) -> None:
        key_id = self.rng.choice(self.world.keys)
        await self.execute([apikey_stream(key_id)], lambda ctx: api_keys.revoke_key(self.repo, ctx, key_id))
