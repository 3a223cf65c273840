-- The fenced append without its probes: a taken event id or idempotency key is caught by the unique
-- indexes instead of being looked up first (the two lookups cost more than the insert itself). The
-- insert then fails with unique_violation, the statement writes nothing, and the appender takes the
-- general path, which tells a replay from a conflict (backend/store/append.py).
create or replace function tally_append_fenced(
    lock_key bigint, expected_head bigint,
    p bigint[], s text[], v int[], t text[], d text[], m text[], i uuid[], r timestamptz[], h bytea[],
    cs text[], ck text[], cf bytea[], cst int[], cb bytea[], cct text[], cp bigint[]
) returns int
language plpgsql volatile as $$
begin
    perform pg_advisory_xact_lock(lock_key);
    if coalesce((select position from events order by position desc limit 1), 0) <> expected_head then
        return -1;
    end if;
    insert into events (position, stream_id, version, type, data, metadata, event_id, recorded_at, hash)
    select x.p, x.s, x.v, x.t, x.d::jsonb, x.m::jsonb, x.i, x.r, x.h
    from unnest(p, s, v, t, d, m, i, r, h) as x(p, s, v, t, d, m, i, r, h);
    if cardinality(cs) > 0 then
        insert into idempotency_keys (scope, key, fingerprint, status, body, content_type, position)
        select * from unnest(cs, ck, cf, cst, cb, cct, cp);
    end if;
    perform pg_notify('tally_events', (expected_head + coalesce(array_length(p, 1), 0))::text);
    return 0;
end
$$;
