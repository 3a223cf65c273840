-- The first outcome of each (API key, Idempotency-Key), stored in the same transaction as its events
-- (see backend/store/idempotency.py) and replayed byte for byte on a repeat.
create table idempotency_keys (
    scope        text not null,
    key          text not null check (length(key) between 1 and 255),
    fingerprint  bytea not null,
    status       int not null,
    body         bytea not null,
    content_type text not null,
    position     bigint not null default 0,
    created_at   timestamptz not null default now(),
    primary key (scope, key)
);
create index idempotency_keys_created_at on idempotency_keys (created_at);
