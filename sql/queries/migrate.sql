-- Queries of the migration runner (pgsink.engine.migrate).

-- name: migrations_bootstrap
create schema if not exists pgsink;
create table if not exists pgsink.schema_migrations (
    version     integer primary key,
    name        text not null,
    checksum    text not null,
    applied_at  timestamptz not null default now()
)

-- name: migrations_applied
select version, name, checksum, applied_at
from pgsink.schema_migrations
order by version

-- name: migrations_schema_exists
select to_regclass('pgsink.schema_migrations') is not null

-- name: migrations_record
insert into pgsink.schema_migrations (version, name, checksum) values (%s, %s, %s)

-- name: migrations_lock
select pg_advisory_lock(hashtext('pgsink.migrate'))

-- name: migrations_unlock
select pg_advisory_unlock(hashtext('pgsink.migrate'))
