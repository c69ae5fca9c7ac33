-- Backfill jobs (pgsink.engine.backfill).  The page query itself is built
-- from identifiers with psycopg.sql (its table and key columns vary).

-- name: backfill_claim
-- The oldest job nobody holds (pending, or running with an expired lease:
-- its worker died), claimed with SKIP LOCKED so workers never wait on each other.
update pgsink.backfills b
set state = 'running', lease_owner = %(owner)s,
    lease_expires = now() + make_interval(secs => %(lease_seconds)s),
    started_at = coalesce(b.started_at, now())
where b.id = (
    select id from pgsink.backfills
    where state in ('pending', 'running') and (lease_expires is null or lease_expires < now())
    order by created_at
    limit 1
    for update skip locked)
returning b.id, b.sink_id, b.table_schema, b.table_name, b.sort_column, b.start_position::text,
          b.cursor::text, b.rows_done, b.rows_estimate, b.page_size, b.max_page_ms

-- name: backfill_set_estimate
update pgsink.backfills set rows_estimate = %(estimate)s where id = %(id)s and lease_owner = %(owner)s

-- name: backfill_finish
update pgsink.backfills
set state = %(state)s, error = %(error)s, completed_at = now(), lease_owner = null, lease_expires = null
where id = %(id)s and lease_owner = %(owner)s and state = 'running'

-- name: backfill_release
update pgsink.backfills set lease_owner = null, lease_expires = null
where id = %(id)s and lease_owner = %(owner)s

-- name: backfill_lock_sink
select pgsink.lock_sinks_for_enqueue(array[%(sink_id)s]::uuid[])

-- name: backfill_recent_changes
-- Captured changes of the page's rows since the page's snapshot minus a
-- margin, with their transaction ids, to find the ones the snapshot did not see,
-- and what the sink's actions and filters need to tell whether the change was
-- sent to this sink (the row and metadata only when the sink has filters).
-- A join, not "record_pk = any(array)": as a filter that compares every change
-- row with every key of the page (measured: 6.7 s for a 10k-row page against
-- 14k changes under a generic plan), while a join hashes the keys or probes
-- the changes_row index per key. Run unprepared, so it is planned for the
-- page's real size. The keys come as one JSON array (cheaper to send than a
-- text[] of 10k keys).
select c.record_pk, c.xid, c.action,
       case when %(filtered)s then c.record::text end,
       case when %(filtered)s then c.changes::text end,
       case when %(filtered)s then c.committed_at end,
       c.commit_lsn, c.commit_idx,
       case when %(filtered)s then c.transaction_annotations::text end
from json_array_elements_text(%(record_pks)s::json) as p(record_pk)
join pgsink.changes c
  on c.source_id = %(source_id)s and c.source_table_oid = %(table_oid)s
 and c.record_pk = p.record_pk and c.committed_at >= %(since)s

-- name: backfill_enqueue_page
select pgsink.enqueue_backfill_page(%(id)s, %(owner)s, %(cursor)s::jsonb, %(rows_read)s, %(page_size)s,
                                    %(lease_seconds)s, %(read_at)s, %(records)s::jsonb,
                                    %(record_pks)s::jsonb, %(group_keys)s::jsonb)

-- name: backfill_start
select pgsink.start_backfill(%(sink)s, %(table)s, %(sort_column)s, %(start_position)s::jsonb,
                             %(page_size)s, %(max_page_ms)s)

-- name: backfill_cancel
select pgsink.cancel_backfill(%(id)s)

-- name: backfill_list
select id, sink, "table", state, rows_done, rows_estimate, percent, rows_per_second, eta_seconds,
       page_size, sort_column, start_position::text, cursor::text, worker, error, created_at, started_at,
       completed_at
from pgsink.backfill_progress
where %(id)s::uuid is null or id = %(id)s::uuid
order by created_at desc

-- name: source_table_info
-- On the source: the table's oid, its primary key columns in key order, and
-- its estimated row count.
select c.oid::bigint,
       coalesce((select array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
                 from pg_index i
                 join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                 where i.indrelid = c.oid and i.indisprimary), '{}') as pk,
       greatest(c.reltuples, 0)::bigint as estimate
from pg_class c
where c.oid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))

-- name: source_snapshot
-- First statement of the page's REPEATABLE READ transaction: fixes its snapshot.
select pg_current_snapshot()::text, now()

-- name: source_page_transaction
set transaction isolation level repeatable read, read only

-- name: source_page_timeout
-- A page query over its limit is cancelled; the stage halves the page and retries.
select set_config('statement_timeout', %(timeout)s, true)

-- name: source_table_columns
select attname::text, atttypid::bigint
from pg_attribute
where attrelid = %(oid)s::oid and attnum > 0 and not attisdropped
order by attnum

-- name: backfill_initial
-- A sink created by `pgsink config apply` with initial_backfill.
select pgsink.start_backfill(%(sink)s, %(table)s)
