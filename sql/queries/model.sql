-- Reads of config rows by workers (pgsink.engine.model).

-- name: config_sources
select id, name, hostname, port, database, username, password_encrypted, sslmode,
       slot_name, create_slot, publication_name, create_publication,
       publication_init_sql, decoder, retention, annotations
from pgsink.sources
order by name

-- name: config_http_endpoints
select id, name, url, headers, encrypted_headers, signing_secrets_encrypted,
       block_private_addresses, ca_bundle, rate_limit
from pgsink.http_endpoints
order by name

-- name: config_sinks
select id, name, source_id, http_endpoint_id, http_endpoint_path, status,
       include_schemas, exclude_schemas, include_tables, exclude_tables, actions,
       message_grouping, table_options, batch, batch_size, batch_timeout_ms,
       request_timeout_ms, max_ack_pending, max_retry_count, annotations, lane_count,
       filters, filter_sql, filter_function, transform_path, transform_function, route_function,
       function_timeout_ms, enrichment_sql
from pgsink.sinks
order by name

-- name: config_version
select (select count(*) from pgsink.sources), (select max(updated_at) from pgsink.sources),
       (select count(*) from pgsink.http_endpoints), (select max(updated_at) from pgsink.http_endpoints),
       (select count(*) from pgsink.sinks), (select max(updated_at) from pgsink.sinks)
