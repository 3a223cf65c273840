-- The fenced append that tells a missed fence why (backend/store/append.py, AppendBatcher._execute_fenced).
--
-- With several processes appending, the log's head has nearly always moved since a process last saw
-- it, so the fence of tally_append_fenced_rows (0006) misses and the process took the locked path:
-- four round trips holding the store-wide lock. This one answers a miss with the log's head, its last
-- recorded_at and the current (version, hash) of the streams the batch writes, all read under the lock;
-- when those streams are where the process planned them, it plans the same batch again on that head
-- and retries: one more round trip, the lock held only inside the statement. Null means appended.
--
-- tally_append_fenced_rows (0006) stays, unused, for processes of the previous release during a
-- rolling upgrade.
create function tally_append_fenced_streams(lock_key bigint, expected_head bigint, event_rows jsonb,
                                            claim_rows jsonb) returns jsonb
language plpgsql volatile as $$
declare
    last_position bigint;
    last_recorded_at timestamptz;
begin
    perform pg_advisory_xact_lock(lock_key);
    select position, recorded_at into last_position, last_recorded_at
    from events order by position desc limit 1;
    if coalesce(last_position, 0) <> expected_head then
        return jsonb_build_object(
            'head', coalesce(last_position, 0),
            'recorded_at', last_recorded_at,
            'streams', coalesce((
                select jsonb_object_agg(s.stream_id, jsonb_build_array(e.version, encode(e.hash, 'hex')))
                from (select distinct r->>1 as stream_id from jsonb_array_elements(event_rows) as r) as s
                cross join lateral (
                    select version, hash from events where events.stream_id = s.stream_id
                    order by version desc limit 1
                ) as e), '{}'::jsonb));
    end if;
    perform tally_insert_appended(event_rows, claim_rows);
    perform pg_notify('tally_events', (expected_head + jsonb_array_length(event_rows))::text);
    return null;
end
$$;
