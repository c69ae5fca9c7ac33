-- Queries of the reader (pgsink.engine.capture, pgsink.engine.ingest).

-- name: reader_try_lead
select pg_try_advisory_lock(hashtext('pgsink.reader'), hashtext(%s::text))

-- name: checkpoint_get
insert into pgsink.source_checkpoints (source_id) values (%s)
on conflict (source_id) do update set source_id = excluded.source_id
returning commit_lsn, commit_idx, ack_lsn, system_identifier

-- name: checkpoint_for_system
-- Ties the checkpoint to the cluster the reader is connected to. One recorded
-- for another cluster is reset (its LSNs mean nothing here); none recorded
-- yet (new, or from before version 6) is taken as this cluster's.
update pgsink.source_checkpoints
set commit_lsn = case when system_identifier is null then commit_lsn else 0 end,
    commit_idx = case when system_identifier is null then commit_idx else 2147483647 end,
    ack_lsn = case when system_identifier is null then ack_lsn else 0 end,
    system_identifier = %(system)s
where source_id = %(source_id)s and system_identifier is distinct from %(system)s

-- name: message_id_high
select last_value from pgsink.message_id_seq

-- name: ensure_partitions
select pgsink.ensure_partitions(%s, %s, %s, %s)

-- name: copy_changes
-- Binary rows (engine.ingest), the fields a transaction's rows share first.
copy pgsink.changes (source_id, commit_lsn, xid, committed_at, source_table_oid, source_table_schema,
                     source_table_name, action, commit_idx, record_pk, record, changes, transaction_annotations)
from stdin with (format binary)

-- name: copy_messages
-- Binary rows (engine.ingest).
copy pgsink.messages (sink_id, lane, commit_idx, group_key, action, commit_lsn, committed_at)
from stdin with (format binary)

-- name: last_retained_record
select record::text
from pgsink.changes
where source_id = %s and source_table_oid = %s and record_pk = %s
order by commit_lsn desc, commit_idx desc
limit 1

-- name: capture_begin
select pgsink.capture_begin(%s, %s::uuid[], %s, %s)

-- name: capture_finish
with checkpoint as (
    update pgsink.source_checkpoints
    set commit_lsn = %s, commit_idx = %s, ack_lsn = %s, updated_at = now()
    where source_id = %s
    returning 1
)
select pg_notify('pgsink_messages', s)
from checkpoint, unnest(%s::text[]) as s
