-- Appends pass their rows as one jsonb document per table instead of one array per column.
--
-- asyncpg checks every element of an array parameter against collections.abc ABCs, in Python (about
-- 3,000 instructions an element, some 26 elements a command): 12 % of the server's instructions per
-- command went there. A jsonb document is one scalar parameter, serialised by orjson in C.
--
-- Row layouts (arrays, in this order; bytea as hex):
--   event_rows: [position, stream_id, version, type, data, metadata, event_id, recorded_at, hash]
--   claim_rows: [scope, key, fingerprint, status, body, content_type, position]
--
-- tally_append_fenced (0005) stays, unused, for processes of the previous release during a rolling
-- upgrade.
create function tally_insert_appended(event_rows jsonb, claim_rows jsonb) returns void
language plpgsql volatile as $$
begin
    insert into events (position, stream_id, version, type, data, metadata, event_id, recorded_at, hash)
    select (e->>0)::bigint, e->>1, (e->>2)::int, e->>3, e->4, e->5, (e->>6)::uuid, (e->>7)::timestamptz,
           decode(e->>8, 'hex')
    from jsonb_array_elements(event_rows) as e;
    if jsonb_array_length(claim_rows) > 0 then
        insert into idempotency_keys (scope, key, fingerprint, status, body, content_type, position)
        select c->>0, c->>1, decode(c->>2, 'hex'), (c->>3)::int, decode(c->>4, 'hex'), c->>5, (c->>6)::bigint
        from jsonb_array_elements(claim_rows) as c;
    end if;
end
$$;

-- The fenced append (see 0005): one round trip while this process was the last to append.
create function tally_append_fenced_rows(lock_key bigint, expected_head bigint, event_rows jsonb,
                                         claim_rows jsonb) returns int
language plpgsql volatile as $$
begin
    perform pg_advisory_xact_lock(lock_key);
    if coalesce((select position from events order by position desc limit 1), 0) <> expected_head then
        return -1;
    end if;
    perform tally_insert_appended(event_rows, claim_rows);
    perform pg_notify('tally_events', (expected_head + jsonb_array_length(event_rows))::text);
    return 0;
end
$$;
