-- Inspect and repair (pgsink.engine.ops): thin reads of the views and calls
-- of the functions of migration 0002, for the CLI.

-- name: ops_status
select sink, source, state, lag_messages, lag_seconds, pending_messages, in_flight_messages,
       parked_messages, discarded_messages, delivered_per_second, failing_groups, failing_lanes,
       last_error, last_error_at
from pgsink.sink_status
where %(sink)s::text is null or sink = %(sink)s::text
order by sink

-- name: ops_slot_lag
select active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint as lag_bytes
from pg_replication_slots
where slot_name = %(slot)s

-- name: ops_messages
select id, state, action, table_schema, table_name, record_pk, group_key, attempts,
       committed_at, last_attempt_at, last_http_status, last_error, last_response
from pgsink.message_states
where sink_id = (pgsink.sink_by_name(%(sink)s)).id
  and (%(states)s::text[] is null or state = any(%(states)s::text[]))
  and (%(failed)s::boolean is not true or attempts > 0)
order by id
limit %(limit)s

-- name: ops_message
-- One message of a sink, delivered or not (while its partition is kept),
-- with its change or its backfilled row.
with s as (select * from pgsink.sink_by_name(%(sink)s)),
m as (
    (select m.id, m.lane, m.group_key, m.action, m.commit_lsn, m.commit_idx, m.committed_at, m.payload
     from pgsink.messages m, s
     where m.sink_id = s.id and m.id = %(id)s
     union all
     select pm.id, pm.lane, pm.group_key, pm.action, pm.commit_lsn, pm.commit_idx, pm.committed_at, pm.payload
     from pgsink.parked_messages pm, s
     where pm.sink_id = s.id and pm.id = %(id)s)
    limit 1
)
select m.id, m.lane, m.group_key, m.action, m.commit_lsn, m.commit_idx, m.committed_at,
       coalesce(ms.state, 'delivered') as state,
       coalesce(ms.attempts, 0) as attempts,
       coalesce(c.source_table_schema, m.payload ->> 'table_schema') as table_schema,
       coalesce(c.source_table_name, m.payload ->> 'table_name') as table_name,
       coalesce(c.record_pk, m.payload ->> 'record_pk') as record_pk,
       coalesce(c.record, m.payload -> 'record')::text as record,
       c.changes::text as changes,
       c.transaction_annotations::text as transaction_annotations,
       m.payload ->> 'backfill_id' as backfill_id
from m
cross join s
left join pgsink.message_states ms on ms.sink_id = s.id and ms.id = m.id
left join pgsink.changes c
       on m.action <> 'read' and c.source_id = s.source_id and c.committed_at = m.committed_at
      and c.commit_lsn = m.commit_lsn and c.commit_idx = m.commit_idx

-- name: ops_message_attempts
select id, started_at, duration_ms, status, http_status, error, response_body, message_count
from pgsink.attempt_log
where sink_id = (pgsink.sink_by_name(%(sink)s)).id and %(id)s::bigint = any(message_ids)
order by started_at, id

-- name: ops_replay
select pgsink.replay(%(sink)s, %(since)s, %(until)s, %(table)s, %(action)s)

-- name: ops_sink_filters
select id, name, annotations, filters, filter_sql, filter_function, function_timeout_ms
from pgsink.sinks where name = %(sink)s

-- name: ops_replay_candidates
-- What a replay considers before the sink's filters (json as text: exact digits for the filters).
select c.source_table_schema, c.source_table_name, c.action, c.record::text as record,
       c.changes::text as changes, c.committed_at, c.commit_lsn, c.commit_idx,
       c.transaction_annotations::text as transaction_annotations
from pgsink.replay_candidates(%(sink)s, %(since)s, %(until)s, %(table)s, %(action)s) c

-- name: ops_replay_changes
select pgsink.replay_changes(%(sink)s, %(lsns)s::bigint[], %(idxs)s::integer[], %(ats)s::timestamptz[])

-- name: ops_retry_group
select pgsink.retry_group(%(sink)s, %(group_key)s)

-- name: ops_retry_message
select pgsink.retry_message(%(sink)s, %(id)s)

-- name: ops_discard
select pgsink.discard(%(sink)s, %(id)s)
