-- Read models (projections/). Each projection owns the tables listed beside it and nothing else,
-- so it can be rebuilt (projections/rebuild.py builds fresh copies with `like ... including all`
-- and swaps them in) or fail (a poison event) on its own. Indexes are left unnamed on purpose: the
-- copies get the same default names, so a rebuild leaves the schema exactly as this file made it.

-- One row per projection: how far it has applied the log, and its last failure. A batch of events
-- and the advance of its checkpoint commit in one transaction.
create table projection_checkpoints (
    name            text primary key,
    position        bigint not null default 0 check (position >= 0),
    updated_at      timestamptz not null default now(),
    error           text,
    failed_position bigint,
    failed_at       timestamptz,
    failures        int not null default 0
);

-- projection "balances": one row per wallet plus its open locks and reservations. `reserved` is
-- as recorded; readers subtract the reservations already past expires_at.
create table wallet_balances (
    wallet_id  uuid primary key,
    owner      text not null,
    currency   text not null,
    balance    bigint not null default 0,
    locked     bigint not null default 0,
    reserved   bigint not null default 0,
    version    int not null,
    opened_at  timestamptz not null,
    updated_at timestamptz not null
);
create index on wallet_balances (owner, wallet_id);

create table wallet_locks (
    lock_id   uuid primary key,
    wallet_id uuid not null,
    amount    bigint not null,
    reason    text not null,
    locked_at timestamptz not null
);
create index on wallet_locks (wallet_id);

create table wallet_reservations (
    reservation_id uuid primary key,
    wallet_id      uuid not null,
    amount         bigint not null,
    expires_at     timestamptz not null,
    reserved_at    timestamptz not null
);
create index on wallet_reservations (wallet_id, expires_at);

-- projection "reservations": every reservation with its outcome.
create table reservation_wallets (
    wallet_id uuid primary key,
    owner     text not null,
    currency  text not null
);

create table reservations (
    reservation_id   uuid primary key,
    wallet_id        uuid not null,
    owner            text not null,
    currency         text not null,
    amount           bigint not null,
    status           text not null,
    confirmed_amount bigint,
    expires_at       timestamptz not null,
    created_at       timestamptz not null,
    closed_at        timestamptz
);
create index on reservations (wallet_id);

-- projection "deposits"
create table deposit_wallets (
    wallet_id uuid primary key,
    owner     text not null
);

create table deposits (
    deposit_id     uuid primary key,
    wallet_id      uuid not null,
    owner          text not null,
    currency       text not null,
    address        text not null,
    status         text not null,
    confirmations  int not null default 0,
    amount         bigint,
    chain_tx_id    text,
    failure_reason text,
    version        int not null,
    created_at     timestamptz not null,
    updated_at     timestamptz not null
);
create index on deposits (wallet_id);

-- projection "api_keys": what authentication needs, without loading aggregates.
create table api_keys (
    key_id      uuid primary key,
    owner       text not null,
    name        text not null,
    scopes      text[] not null,
    secret_hash text not null,
    expires_at  timestamptz,
    revoked     boolean not null default false,
    revoked_at  timestamptz,
    created_at  timestamptz not null,
    version     int not null
);
create index on api_keys (owner, created_at);

-- projection "stats": totals per currency (numeric: a sum over many wallets can pass 2^63).
create table stats_wallets (
    wallet_id uuid primary key,
    currency  text not null
);

create table stats_currencies (
    currency text primary key,
    wallets  bigint not null default 0,
    credited numeric not null default 0,
    debited  numeric not null default 0,
    settled  numeric not null default 0,
    locked   numeric not null default 0,
    reserved numeric not null default 0
);

create table stats_reservations (
    reservation_id uuid primary key,
    currency       text not null,
    amount         bigint not null,
    expires_at     timestamptz not null
);
create index on stats_reservations (expires_at);

create table stats_deposits (
    deposit_id uuid primary key,
    currency   text not null,
    status     text not null
);

create table stats_deposit_counts (
    currency text not null,
    status   text not null,
    count    bigint not null,
    primary key (currency, status)
);

create table stats_event_types (
    type  text primary key,
    count bigint not null
);

-- projection "expiry" (a process manager): open reservations by deadline. The runner reads the
-- earliest due ones through this index and never scans.
create table expiry_schedule (
    reservation_id uuid primary key,
    wallet_id      uuid not null,
    expires_at     timestamptz not null
);
create index on expiry_schedule (expires_at);
