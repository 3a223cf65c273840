-- The fenced append whose fence is the batch's own streams (backend/store/append.py,
-- AppendBatcher._execute_fenced), not the log's head.
--
-- With several processes appending, 0009's fence (the log's head is still the one the batch was
-- planned on) missed on most batches: the other process had appended to other streams meanwhile.
-- Nothing in a planned row depends on the head except its position: an event's hash chains its
-- stream's previous hash, its version, type, data and recorded_at. So when the head has moved on but
-- every stream the batch writes is still at the (version, hash) the plan started from, and the log's
-- last recorded_at is not later than the batch's, the rows are exactly what a plan on the current
-- head would give, one position shift apart: they are inserted at head + 1, + 2, ... as found under
-- the lock, and the answer says by how much they moved. Only when a stream has moved, or time has,
-- is the miss answered as 0009 answers it (the head, its last recorded_at and the current (version,
-- hash) of the batch's streams, all read under the lock), for the process to plan again.
--
-- Answers: null, appended at expected_head; {"shift": n}, appended n positions further on; else the
-- miss. `origins` maps each stream the rows write to the [version, hash hex] the plan started from
-- ([0, ...] for a stream expected to be new).
--
-- tally_append_fenced_streams (0009) stays, unused, for processes of the previous release during a
-- rolling upgrade.
create function tally_append_on_streams(lock_key bigint, expected_head bigint, batch_recorded_at timestamptz,
                                        origins jsonb, event_rows jsonb, claim_rows jsonb) returns jsonb
language plpgsql volatile as $$
declare
    last_position bigint;
    last_recorded_at timestamptz;
    shift bigint;
    stream_heads jsonb;
begin
    perform pg_advisory_xact_lock(lock_key);
    select position, recorded_at into last_position, last_recorded_at
    from events order by position desc limit 1;
    last_position := coalesce(last_position, 0);
    shift := last_position - expected_head;
    if shift <> 0 then
        -- the batch's streams as they are: [version, hash hex], absent for a stream with no events
        stream_heads := coalesce((
            select jsonb_object_agg(o.stream_id, jsonb_build_array(e.version, encode(e.hash, 'hex')))
            from jsonb_object_keys(origins) as o(stream_id)
            cross join lateral (
                select version, hash from events where events.stream_id = o.stream_id
                order by version desc limit 1
            ) as e), '{}'::jsonb);
        if shift < 0
           or last_recorded_at > batch_recorded_at
           or exists (
               select 1 from jsonb_each(origins) as o(stream_id, origin)
               where coalesce((stream_heads->o.stream_id->>0)::int, 0) <> (o.origin->>0)::int
                  or (stream_heads ? o.stream_id and stream_heads->o.stream_id->>1 <> o.origin->>1))
        then
            return jsonb_build_object('head', last_position, 'recorded_at', last_recorded_at, 'streams', stream_heads);
        end if;
        event_rows := coalesce((
            select jsonb_agg(jsonb_set(r, '{0}', to_jsonb((r->>0)::bigint + shift)) order by n)
            from jsonb_array_elements(event_rows) with ordinality as e(r, n)), '[]'::jsonb);
        -- claim rows: [scope, key, fingerprint, outcome, position]; position 0 means "appended nothing"
        claim_rows := coalesce((
            select jsonb_agg(case when (c->>4)::bigint > 0 then jsonb_set(c, '{4}', to_jsonb((c->>4)::bigint + shift))
                                  else c end order by n)
            from jsonb_array_elements(claim_rows) with ordinality as k(c, n)), '[]'::jsonb);
    end if;
    perform tally_insert_appended(event_rows, claim_rows);
    perform pg_notify('tally_events', (last_position + jsonb_array_length(event_rows))::text);
    if shift = 0 then
        return null;
    end if;
    return jsonb_build_object('shift', shift);
end
$$;
