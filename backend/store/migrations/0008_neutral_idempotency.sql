-- An Idempotency-Key's record keeps what the first request produced, as plain data, not the HTTP
-- answer rendered from it: `outcome` holds the command bus's encoding (backend/commands/outcome.py),
-- JSON text {"answer": {...}} for a success (its position in `position`) or {"refused": {"code",
-- "detail", "extra", "request_id"}} for a domain rule's refusal. The HTTP edge renders the first answer
-- and every replay from it.
--
-- Records written before this migration held the rendered answer (status, body, content_type). They
-- are converted in place by tally_legacy_outcome: a success's body is the answer itself (its
-- "position" is the record's own), a problem+json body gives back its code, detail, request_id and
-- the extra members in their order (json, not jsonb, keeps it), so a replay renders the same bytes.
-- The old columns stay, nullable and unused, for processes of the previous release during a rolling
-- upgrade: their records (claim rows of seven members) are converted as they are inserted. Such a
-- process cannot replay a record written by this release; a later migration drops the columns.
--
-- claim_rows layout from now on: [scope, key, fingerprint, outcome, position] (bytea as hex).
create function tally_legacy_outcome(body bytea, content_type text) returns bytea
language plpgsql immutable as $$
declare
    problem json;
begin
    if content_type is distinct from 'application/problem+json' then
        return convert_to('{"answer":' || convert_from(body, 'UTF8') || '}', 'UTF8');
    end if;
    problem := convert_from(body, 'UTF8')::json;
    return convert_to(json_build_object('refused', json_build_object(
        'code', problem->'code',
        'detail', problem->'detail',
        'extra', coalesce((select json_object_agg(member.key, member.value order by member.n)
                           from json_each(problem) with ordinality as member(key, value, n)
                           where member.key not in ('type', 'title', 'status', 'detail', 'code', 'request_id')),
                          '{}'::json),
        'request_id', problem->'request_id'))::text, 'UTF8');
end
$$;

alter table idempotency_keys add column outcome bytea;
update idempotency_keys set outcome = tally_legacy_outcome(body, content_type);
alter table idempotency_keys
    alter column outcome set not null,
    alter column status drop not null,
    alter column body drop not null,
    alter column content_type drop not null;

-- 0006's function keeps its name's job for the events (given no claim rows); the one that takes its
-- name inserts the claim rows of either layout. tally_append_fenced_rows calls it by name.
alter function tally_insert_appended(jsonb, jsonb) rename to tally_insert_appended_0006;

create function tally_insert_appended(event_rows jsonb, claim_rows jsonb) returns void
language plpgsql volatile as $$
begin
    perform tally_insert_appended_0006(event_rows, '[]'::jsonb);
    if jsonb_array_length(claim_rows) > 0 then
        insert into idempotency_keys (scope, key, fingerprint, outcome, position, status, body, content_type)
        select c->>0, c->>1, decode(c->>2, 'hex'),
               case when jsonb_array_length(c) = 5 then decode(c->>3, 'hex')
                    else tally_legacy_outcome(decode(c->>4, 'hex'), c->>5) end,
               (c->>(jsonb_array_length(c) - 1))::bigint,
               case when jsonb_array_length(c) = 7 then (c->>3)::int end,
               case when jsonb_array_length(c) = 7 then decode(c->>4, 'hex') end,
               case when jsonb_array_length(c) = 7 then c->>5 end
        from jsonb_array_elements(claim_rows) as c;
    end if;
end
$$;
