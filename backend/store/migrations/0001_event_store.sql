-- The event log. Positions are assigned by the appender while it holds the store-wide append lock,
-- so they are gap-free and become visible strictly in order (see backend/store/append.py).
create table events (
    position    bigint primary key check (position > 0),
    stream_id   text not null check (length(stream_id) between 1 and 256),
    version     int not null check (version >= 1),
    type        text not null check (length(type) between 1 and 128),
    data        jsonb not null,
    metadata    jsonb not null default '{}'::jsonb,
    event_id    uuid not null unique,
    recorded_at timestamptz not null,
    hash        bytea not null check (length(hash) = 32),
    unique (stream_id, version)
);

-- read_all with a type filter, time-bounded audit pages
create index events_type_position on events (type, position);
create index events_recorded_at on events (recorded_at);

create function events_are_immutable() returns trigger language plpgsql as $$
begin
    raise exception 'events are immutable: % is not allowed on events', tg_op
        using errcode = 'restrict_violation';
end
$$;

create trigger events_no_update_delete before update or delete on events
    for each row execute function events_are_immutable();
create trigger events_no_truncate before truncate on events
    for each statement execute function events_are_immutable();

-- A snapshot is a cache of an aggregate's state at a version; deleting every row changes no answer.
create table snapshots (
    stream_id  text not null,
    version    int not null,
    type       text not null,
    state      jsonb not null,
    created_at timestamptz not null default now(),
    primary key (stream_id, version)
);
