-- Endpoint security and sink functions (pgsink.engine.http_safety, pgsink.engine.config,
-- pgsink.engine.signing): columns of migration 0003, written after the main config write.

-- name: take_rate_token
select pgsink.take_rate_token(%(endpoint_id)s, %(rate)s)

-- name: endpoint_security_get
select signing_secrets_encrypted from pgsink.http_endpoints where name = %(name)s for update

-- name: endpoint_security_set
update pgsink.http_endpoints set
    signing_secrets_encrypted = %(signing_secrets_encrypted)s,
    block_private_addresses = %(block_private_addresses)s, ca_bundle = %(ca_bundle)s,
    rate_limit = %(rate_limit)s, updated_at = now()
where name = %(name)s

-- name: endpoint_signing_set
update pgsink.http_endpoints set signing_secrets_encrypted = %(signing_secrets_encrypted)s, updated_at = now()
where name = %(name)s

-- name: endpoint_signing_get
select signing_secrets_encrypted from pgsink.http_endpoints where name = %(name)s

-- name: sink_functions_set
update pgsink.sinks set
    filters = %(filters)s, filter_sql = %(filter_sql)s, filter_function = %(filter_function)s,
    transform_path = %(transform_path)s, transform_function = %(transform_function)s,
    route_function = %(route_function)s, function_timeout_ms = %(function_timeout_ms)s,
    enrichment_sql = %(enrichment_sql)s, updated_at = now()
where name = %(name)s

-- name: recent_changes
-- The last retained changes of a source (newest first), shaped like read_lane_batch's rows,
-- for `pgsink sink test`; the caller keeps those of the sink's tables and actions.
select 0 as id, null::text as group_key, c.action, c.commit_lsn, c.commit_idx,
       to_char(c.committed_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as commit_timestamp,
       c.source_table_schema, c.source_table_name, c.record::text, c.changes::text,
       c.transaction_annotations::text, null::text as backfill_id, c.record_pk,
       false as group_parked, false as group_blocked, 0 as attempts
from pgsink.changes c
where c.source_id = %(source_id)s
order by c.committed_at desc, c.commit_lsn desc, c.commit_idx desc
limit %(limit)s
