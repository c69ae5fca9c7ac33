-- Retention and queue pruning (pgsink.engine.maintenance).  Partitions are
-- dropped whole, never deleted row by row; each drop first takes the
-- partition's lock and only then checks that nothing still needs it, so a
-- writer that was inserting into it has committed and is seen.

-- name: maintenance_try_lock
-- One maintenance pass at a time across workers (session lock, released after the pass).
select pg_try_advisory_lock(hashtext('pgsink.maintenance'))

-- name: maintenance_unlock
select pg_advisory_unlock(hashtext('pgsink.maintenance'))

-- name: maintenance_precreate
-- Today's and tomorrow's partitions of the retention log, before capture needs them.
select pgsink.ensure_partitions(now(), now() + interval '1 day', null, null)

-- name: maintenance_partitions
-- Partitions of a pgsink table, by name (their bounds follow from the names
-- ensure_partitions gives them).
select c.relname
from pg_inherits i
join pg_class c on c.oid = i.inhrelid
where i.inhparent = %(parent)s::regclass
order by c.relname

-- name: maintenance_retention
-- The longest retention of any source: the retention log is shared, a day
-- partition goes only when every source is done with it.  Null: no source.
select max(retention) from pgsink.sources

-- name: maintenance_last_message_id
select last_value from pgsink.message_id_seq

-- name: maintenance_lock_timeout
-- Dropping a partition locks its parent: give up quickly (next pass retries)
-- rather than queue capture and delivery behind a long reader.
select set_config('lock_timeout', %(timeout)s, true)

-- name: maintenance_changes_needed
-- Whether a pending message (after its lane's cursor) or a parked one still
-- points at a change committed in [lo, hi).
select exists (
           select 1
           from pgsink.sinks s
           cross join pgsink.sink_lanes(s) l
           join pgsink.messages m on m.sink_id = s.id and m.lane = l.lane and m.id > l.delivered_id
           where m.action <> 'read' and m.committed_at >= %(lo)s and m.committed_at < %(hi)s)
    or exists (
           select 1 from pgsink.parked_messages pm
           where pm.state = 'parked' and pm.action <> 'read'
             and pm.committed_at >= %(lo)s and pm.committed_at < %(hi)s)

-- name: maintenance_messages_needed
-- Whether a message with an id in [lo, hi) is still after its lane's cursor
-- (one index probe per lane).  Parked messages are copies: they do not count.
select exists (
    select 1
    from pgsink.sinks s
    cross join pgsink.sink_lanes(s) l
    where exists (select 1 from pgsink.messages m
                  where m.sink_id = s.id and m.lane = l.lane
                    and m.id > greatest(l.delivered_id, %(lo)s::bigint - 1) and m.id < %(hi)s::bigint))
