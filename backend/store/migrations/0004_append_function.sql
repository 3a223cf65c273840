-- The append fast path: one statement (so one round trip, in autocommit) that takes the store-wide
-- append lock, checks that the log's head is still where the appender last left it (the fence: no
-- other process has appended since, so the appender's cached stream heads are still exact), checks
-- that no event id or idempotency key is taken, and writes. Any failed check returns a negative code
-- and writes nothing; the appender then takes the general path (backend/store/append.py).
create function tally_append_fenced(
    lock_key bigint, expected_head bigint,
    p bigint[], s text[], v int[], t text[], d text[], m text[], i uuid[], r timestamptz[], h bytea[],
    cs text[], ck text[], cf bytea[], cst int[], cb bytea[], cct text[], cp bigint[]
) returns int
language plpgsql volatile as $$
declare
    current_head bigint;
begin
    perform pg_advisory_xact_lock(lock_key);
    select position into current_head from events order by position desc limit 1;
    if coalesce(current_head, 0) <> expected_head then
        return -1;
    end if;
    if exists (select 1 from events where event_id = any(i)) then
        return -2;
    end if;
    if cardinality(cs) > 0
       and exists (select 1 from idempotency_keys where (scope, key) in (select * from unnest(cs, ck))) then
        return -3;
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
