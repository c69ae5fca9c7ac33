-- Config writes (pgsink.engine.config) and source checks (pgsink.engine.source).
--
-- Every write runs inside one transaction that first takes config_lock and
-- ends with config_notify, so workers reload once per change set.

-- name: config_lock
select pg_advisory_xact_lock(hashtext('pgsink.config'))

-- name: config_notify
select pg_notify('pgsink_config', %(what)s)

-- name: source_insert
insert into pgsink.sources (
    name, hostname, port, database, username, password_encrypted, sslmode,
    slot_name, create_slot, publication_name, create_publication, publication_init_sql,
    decoder, retention, annotations)
values (
    %(name)s, %(hostname)s, %(port)s, %(database)s, %(username)s, %(password_encrypted)s, %(sslmode)s,
    %(slot_name)s, %(create_slot)s, %(publication_name)s, %(create_publication)s, %(publication_init_sql)s,
    %(decoder)s, %(retention)s, %(annotations)s)

-- name: source_update
update pgsink.sources set
    hostname = %(hostname)s, port = %(port)s, database = %(database)s, username = %(username)s,
    password_encrypted = %(password_encrypted)s, sslmode = %(sslmode)s,
    slot_name = %(slot_name)s, create_slot = %(create_slot)s,
    publication_name = %(publication_name)s, create_publication = %(create_publication)s,
    publication_init_sql = %(publication_init_sql)s, decoder = %(decoder)s,
    retention = %(retention)s, annotations = %(annotations)s, updated_at = now()
where name = %(name)s

-- name: source_delete
delete from pgsink.sources where name = %(name)s

-- name: sinks_using_source
select s.name
from pgsink.sinks s join pgsink.sources so on so.id = s.source_id
where so.name = %(name)s
order by s.name

-- name: endpoint_insert
insert into pgsink.http_endpoints (name, url, headers, encrypted_headers)
values (%(name)s, %(url)s, %(headers)s, %(encrypted_headers)s)

-- name: endpoint_update
update pgsink.http_endpoints set
    url = %(url)s, headers = %(headers)s, encrypted_headers = %(encrypted_headers)s, updated_at = now()
where name = %(name)s

-- name: endpoint_delete
delete from pgsink.http_endpoints where name = %(name)s

-- name: sinks_using_endpoint
select s.name
from pgsink.sinks s join pgsink.http_endpoints e on e.id = s.http_endpoint_id
where e.name = %(name)s
order by s.name

-- name: sink_insert
insert into pgsink.sinks (
    name, source_id, http_endpoint_id, http_endpoint_path, status,
    include_schemas, exclude_schemas, include_tables, exclude_tables, actions,
    message_grouping, table_options, batch, batch_size, batch_timeout_ms,
    request_timeout_ms, max_ack_pending, max_retry_count, annotations, lane_count)
values (
    %(name)s,
    (select id from pgsink.sources where name = %(source)s),
    (select id from pgsink.http_endpoints where name = %(http_endpoint)s),
    %(http_endpoint_path)s, %(status)s,
    %(include_schemas)s, %(exclude_schemas)s, %(include_tables)s, %(exclude_tables)s, %(actions)s,
    %(message_grouping)s, %(table_options)s, %(batch)s, %(batch_size)s, %(batch_timeout_ms)s,
    %(request_timeout_ms)s, %(max_ack_pending)s, %(max_retry_count)s, %(annotations)s, %(lane_count)s)
returning id

-- name: sink_lanes_insert
insert into pgsink.lanes (sink_id, lane)
select %(id)s, generate_series(0, %(lane_count)s - 1)

-- name: sink_update
update pgsink.sinks set
    source_id = (select id from pgsink.sources where name = %(source)s),
    http_endpoint_id = (select id from pgsink.http_endpoints where name = %(http_endpoint)s),
    http_endpoint_path = %(http_endpoint_path)s, status = %(status)s,
    include_schemas = %(include_schemas)s, exclude_schemas = %(exclude_schemas)s,
    include_tables = %(include_tables)s, exclude_tables = %(exclude_tables)s, actions = %(actions)s,
    message_grouping = %(message_grouping)s, table_options = %(table_options)s, batch = %(batch)s,
    batch_size = %(batch_size)s, batch_timeout_ms = %(batch_timeout_ms)s,
    request_timeout_ms = %(request_timeout_ms)s, max_ack_pending = %(max_ack_pending)s,
    max_retry_count = %(max_retry_count)s, annotations = %(annotations)s, updated_at = now()
where name = %(name)s

-- name: sink_status
select status from pgsink.sinks where name = %(name)s for update

-- name: sink_set_status
update pgsink.sinks set status = %(status)s, updated_at = now()
where name = %(name)s

-- name: sink_delete
delete from pgsink.sinks where name = %(name)s

-- ---------------------------------------------------------------- source checks
-- Run against the source database, not the state database.

-- name: source_wal_level
select current_setting('wal_level') as wal_level

-- name: source_role
select r.rolsuper, r.rolreplication,
       coalesce((select pg_has_role(current_user, x.oid, 'member')
                 from pg_roles x where x.rolname = 'rds_replication'), false) as rds_replication
from pg_roles r
where r.rolname = current_user

-- name: source_ensure_lock
-- Serialises creating the publication and slot across concurrent applies and
-- workers: CREATE PUBLICATION racing itself fails on a catalog unique index.
select pg_advisory_lock(hashtext('pgsink.ensure'), hashtext(%(slot)s::text))

-- name: source_ensure_unlock
select pg_advisory_unlock(hashtext('pgsink.ensure'), hashtext(%(slot)s::text))

-- name: source_slot
select slot_name, plugin, slot_type, database, active, active_pid
from pg_replication_slots
where slot_name = %(slot)s

-- name: source_publication
select pubname, puballtables, pubinsert, pubupdate, pubdelete
from pg_publication
where pubname = %(publication)s

-- name: source_tables_status
select t.schema, t.name, c.oid is not null as table_exists,
       exists (select 1 from pg_publication_tables p
               where p.pubname = %(publication)s and p.schemaname = t.schema and p.tablename = t.name)
           as published
from unnest(%(schemas)s::text[], %(names)s::text[]) as t (schema, name)
left join pg_namespace n on n.nspname = t.schema
left join pg_class c on c.relnamespace = n.oid and c.relname = t.name and c.relkind in ('r', 'p')
order by t.schema, t.name

-- name: source_replica_identity
select p.schemaname as schema, p.tablename as name, c.relreplident,
       exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) as has_pk
from pg_publication_tables p
join pg_namespace n on n.nspname = p.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
where p.pubname = %(publication)s and p.schemaname <> %(state_schema)s
order by p.schemaname, p.tablename

-- name: source_create_slot
select pg_create_logical_replication_slot(%(slot)s, %(plugin)s)

-- name: source_drop_slot
select pg_drop_replication_slot(%(slot)s)
