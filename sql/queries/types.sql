-- Catalog reads of pgsink.engine.values.TypeRegistry: what a type's text output
-- means (enums, domains, composites, arrays) and the facts about a published
-- table that the replication stream does not carry (primary key, replica
-- identity columns, column list, partition root).

-- name: types_by_oid
select t.oid::int8, t.typname::text, n.nspname::text, t.typtype::text, t.typcategory::text,
       t.typelem::int8, t.typbasetype::int8, t.typdelim::text,
       coalesce(a.names, '{}'::text[]), coalesce(a.types, '{}'::int8[])
from pg_catalog.pg_type t
join pg_catalog.pg_namespace n on n.oid = t.typnamespace
left join lateral (
    select array_agg(att.attname::text order by att.attnum) as names,
           array_agg(att.atttypid::int8 order by att.attnum) as types
    from pg_catalog.pg_attribute att
    where t.typtype = 'c' and att.attrelid = t.typrelid and att.attnum > 0 and not att.attisdropped
) a on true
where t.oid = any(%(oids)s::int8[]::oid[])

-- name: types_relations
with wanted as (
    select c.oid
    from pg_catalog.pg_class c
    where c.oid = any(%(oids)s::int8[]::oid[])
    union
    select c.oid
    from unnest(%(schemas)s::text[], %(names)s::text[]) as w(schema_name, rel_name)
    join pg_catalog.pg_namespace n on n.nspname = w.schema_name
    join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = w.rel_name
)
select c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text,
       coalesce(pk.cols, '{}'::text[]),
       case c.relreplident when 'd' then coalesce(pk.cols, '{}'::text[])
                           when 'i' then coalesce(ri.cols, '{}'::text[])
                           else '{}'::text[] end,
       coalesce(cols.names, '{}'::text[]), coalesce(cols.types, '{}'::int8[]),
       coalesce(cols.lens, '{}'::int4[]), coalesce(cols.gen, '{}'::bool[]),
       root.oid::int8, root_ns.nspname::text, root.relname::text
from wanted w
join pg_catalog.pg_class c on c.oid = w.oid
join pg_catalog.pg_namespace n on n.oid = c.relnamespace
left join lateral (
    select array_agg(att.attname::text order by k.ord) as cols
    from pg_catalog.pg_index i
    cross join lateral unnest(i.indkey::int2[]) with ordinality as k(attnum, ord)
    join pg_catalog.pg_attribute att on att.attrelid = i.indrelid and att.attnum = k.attnum
    where i.indrelid = c.oid and i.indisprimary
) pk on true
left join lateral (
    select array_agg(att.attname::text order by k.ord) as cols
    from pg_catalog.pg_index i
    cross join lateral unnest(i.indkey::int2[]) with ordinality as k(attnum, ord)
    join pg_catalog.pg_attribute att on att.attrelid = i.indrelid and att.attnum = k.attnum
    where i.indrelid = c.oid and i.indisreplident
) ri on true
left join lateral (
    select array_agg(att.attname::text order by att.attnum) as names,
           array_agg(att.atttypid::int8 order by att.attnum) as types,
           array_agg(ty.typlen::int4 order by att.attnum) as lens,
           array_agg(att.attgenerated <> '' order by att.attnum) as gen
    from pg_catalog.pg_attribute att
    join pg_catalog.pg_type ty on ty.oid = att.atttypid
    where att.attrelid = c.oid and att.attnum > 0 and not att.attisdropped
) cols on true
left join pg_catalog.pg_class root
    on c.relispartition and root.oid = pg_catalog.pg_partition_root(c.oid)
left join pg_catalog.pg_namespace root_ns on root_ns.oid = root.relnamespace
