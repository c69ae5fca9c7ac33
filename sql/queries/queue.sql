-- The delivery queue (pgsink.engine.queue): lane leases, batch reads, acks,
-- parking and the attempt log.
--
-- Every statement that moves a lane or a parked group is fenced on its lease
-- (lease_owner, and for lanes delivered_id too), so a worker whose lease
-- expired can never move a cursor that another worker now owns.  Acks are
-- single statements (data-modifying CTEs): one round trip, atomic, no
-- per-message UPDATE on the success path.

-- name: ensure_lanes
insert into pgsink.lanes (sink_id, lane)
select %(sink_id)s, g::smallint
from generate_series(0, %(lane_count)s - 1) g
on conflict do nothing

-- name: lock_sink_leases
-- Serialises the max_ack_pending check of one sink across workers.  An
-- advisory lock rather than a row lock on pgsink.sinks: no tuple write and
-- no multixact with the FK key-share locks that attempt inserts take.
select pg_advisory_xact_lock(hashtext('pgsink.lease'), hashtext(%(sink_id)s::text))

-- name: lease_lanes
-- Lanes that have work (a message after the cursor), are not leased and are
-- not backing off; each gets a reservation of up to batch_size messages from
-- what max_ack_pending leaves (its own held in_flight counts as its own).
-- Candidates rotate by %(offset)s so no lane starves under back-pressure.
with pending as (
    select coalesce((select sum(in_flight) from pgsink.lanes where sink_id = %(sink_id)s), 0)
         + coalesce((select sum(in_flight) from pgsink.parked_groups where sink_id = %(sink_id)s), 0) as n
),
candidates as (
    select l.lane, l.in_flight, mod(l.lane + %(offset)s, %(lane_count)s) as turn
    from pgsink.lanes l
    cross join lateral (
        -- one index probe per lane (a semi-join could hash the whole queue)
        select m.id from pgsink.messages m
        where m.sink_id = l.sink_id and m.lane = l.lane and m.id > l.delivered_id
        order by m.id
        limit 1
    ) next_message
    where l.sink_id = %(sink_id)s
      and (l.lease_expires is null or l.lease_expires < now())
      and (l.retry_at is null or l.retry_at <= now())
    order by turn
    limit %(max_lanes)s
    for update of l skip locked
),
granted as (
    -- never less than what the lane already holds: taking that back does not grow the total, and
    -- after max_ack_pending is lowered below what is held, it is how the holders drain (else no one
    -- would ever have room again)
    select c.lane,
           least(%(batch_size)s::bigint, greatest(c.in_flight::bigint,
                 %(max_ack_pending)s::bigint - p.n + c.in_flight
                 - coalesce(sum(%(batch_size)s::bigint - c.in_flight)
                            over (order by c.turn rows between unbounded preceding and 1 preceding), 0))) as room
    from candidates c cross join pending p
)
update pgsink.lanes l
set lease_owner = %(owner)s,
    lease_expires = now() + make_interval(secs => %(lease_seconds)s),
    in_flight = g.room
from granted g
where l.sink_id = %(sink_id)s and l.lane = g.lane and g.room > 0
returning l.lane, l.delivered_id, l.failures, l.in_flight

-- name: read_lane_batch
-- The next messages of a lane after its cursor, by an index range scan on
-- messages' primary key, with their change (jsonb as text: exact digits) and
-- whether their group is parked.
select b.id, b.group_key, b.action, b.commit_lsn, b.commit_idx,
       to_char(b.committed_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as commit_timestamp,
       coalesce(c.source_table_schema, b.payload ->> 'table_schema') as table_schema,
       coalesce(c.source_table_name, b.payload ->> 'table_name') as table_name,
       coalesce(c.record, b.payload -> 'record')::text as record,
       c.changes::text as changes,
       c.transaction_annotations::text as transaction_annotations,
       b.payload ->> 'backfill_id' as backfill_id,
       coalesce(c.record_pk, b.payload ->> 'record_pk') as record_pk,
       g.group_key is not null as group_parked,
       g.group_key is not null and exists (
           select 1 from pgsink.parked_messages pm
           where pm.sink_id = b.sink_id and pm.group_key = b.group_key and pm.state = 'parked'
       ) as group_blocked,
       0 as attempts
from (
    select m.id, m.sink_id, m.group_key, m.action, m.commit_lsn, m.commit_idx, m.committed_at, m.payload
    from pgsink.messages m
    where m.sink_id = %(sink_id)s and m.lane = %(lane)s::smallint and m.id > %(after_id)s::bigint
    order by m.id
    limit %(limit)s
) b
left join pgsink.changes c
       on b.action <> 'read'
      and c.committed_at = b.committed_at and c.source_id = %(source_id)s
      and c.commit_lsn = b.commit_lsn and c.commit_idx = b.commit_idx
left join pgsink.parked_groups g on g.sink_id = b.sink_id and g.group_key = b.group_key
order by b.id

-- name: release_lane
update pgsink.lanes
set lease_owner = null, lease_expires = null,
    in_flight = case when failures > 0 then in_flight else 0 end
where sink_id = %(sink_id)s and lane = %(lane)s and lease_owner = %(owner)s

-- name: ack_lane
-- The common success path: cursor past the batch + the attempt row, nothing
-- else.  With keep, the worker goes on with the lane's next batch under the
-- same lease and the same reservation (a full batch: more is waiting).
with lane as (
    update pgsink.lanes
    set delivered_id = %(last_id)s::bigint, failures = 0, retry_at = null, last_error = null,
        in_flight = case when %(keep)s then in_flight else 0 end,
        lease_owner = case when %(keep)s then lease_owner end,
        lease_expires = case when %(keep)s then now() + make_interval(secs => %(lease_seconds)s) end
    where sink_id = %(sink_id)s and lane = %(lane)s
      and lease_owner = %(owner)s and delivered_id = %(after_id)s::bigint
    returning sink_id, lane
),
attempt as (
    insert into pgsink.attempts
        (sink_id, lane, message_ids, started_at, duration_ms, http_status, response_body, error, delivered)
    select lane.sink_id, lane.lane, %(attempt_ids)s::bigint[], %(started_at)s, %(duration_ms)s,
           %(http_status)s, %(response_body)s, null, true
    from lane
)
select count(*) from lane

-- name: advance_lane
-- Move the cursor past a batch, in one statement: the attempt row, copies
-- into parked_messages (parked behind, parked after failing, or discarded)
-- and parked group rows. Groups found drained go next (unpark_groups).
with lane as (
    update pgsink.lanes
    set delivered_id = %(last_id)s::bigint, failures = 0, retry_at = null, in_flight = 0,
        last_error = %(lane_error)s, lease_owner = null, lease_expires = null
    where sink_id = %(sink_id)s and lane = %(lane)s
      and lease_owner = %(owner)s and delivered_id = %(after_id)s::bigint
    returning sink_id, lane
),
attempt as (
    insert into pgsink.attempts
        (sink_id, lane, message_ids, started_at, duration_ms, http_status, response_body, error, delivered)
    select lane.sink_id, lane.lane, %(attempt_ids)s::bigint[], %(started_at)s, %(duration_ms)s,
           %(http_status)s, %(response_body)s, %(error)s, %(delivered)s
    from lane
    where %(attempted)s
),
copied as (
    insert into pgsink.parked_messages
        (sink_id, id, lane, group_key, action, commit_lsn, commit_idx, committed_at, payload,
         state, attempts, discarded_at)
    select m.sink_id, m.id, m.lane, coalesce(m.group_key, 'pgsink:message:' || m.id), m.action,
           m.commit_lsn, m.commit_idx, m.committed_at, m.payload,
           x.state, x.attempts, case when x.state = 'discarded' then now() end
    from lane
    cross join unnest(%(copy_ids)s::bigint[], %(copy_states)s::text[], %(copy_attempts)s::int[])
        as x(id, state, attempts)
    join pgsink.messages m on m.sink_id = lane.sink_id and m.lane = lane.lane and m.id = x.id
    on conflict do nothing
),
parked as (
    insert into pgsink.parked_groups
        (sink_id, group_key, lane, attempts, next_attempt_at, last_error, in_flight)
    select lane.sink_id, g.group_key, lane.lane, g.attempts,
           now() + make_interval(secs => g.delay), %(lane_error)s, g.in_flight
    from lane
    cross join unnest(%(park_keys)s::text[], %(park_attempts)s::int[], %(park_delays)s::float8[],
                      %(park_in_flight)s::int[]) as g(group_key, attempts, delay, in_flight)
    on conflict (sink_id, group_key) do update
    set attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error, in_flight = excluded.in_flight, lane = excluded.lane
),
behind as (
    -- a group whose retrier drained and dropped it meanwhile gets its row back
    insert into pgsink.parked_groups (sink_id, group_key, lane)
    select lane.sink_id, k.group_key, lane.lane
    from lane cross join unnest(%(behind_keys)s::text[]) as k(group_key)
    on conflict do nothing
)
select count(*) from lane

-- name: fail_lane
-- A failed attempt of the lane's head batch: back off, keep its messages
-- counted as pending (max_ack_pending), log the attempt.
with lane as (
    update pgsink.lanes
    set failures = failures + 1, retry_at = now() + make_interval(secs => %(delay)s),
        last_error = %(lane_error)s, in_flight = %(in_flight)s, lease_owner = null, lease_expires = null
    where sink_id = %(sink_id)s and lane = %(lane)s
      and lease_owner = %(owner)s and delivered_id = %(after_id)s::bigint
    returning sink_id, lane
),
attempt as (
    insert into pgsink.attempts
        (sink_id, lane, message_ids, started_at, duration_ms, http_status, response_body, error, delivered)
    select lane.sink_id, lane.lane, %(attempt_ids)s::bigint[], %(started_at)s, %(duration_ms)s,
           %(http_status)s, %(response_body)s, %(error)s, false
    from lane
)
select count(*) from lane

-- name: sink_failure_scope
-- Whether a failing batch is the batch's problem (others get delivered, or
-- nobody else is failing) or the endpoint's (everyone fails): parking only
-- helps in the first case.
select exists (select 1 from pgsink.attempts
               where sink_id = %(sink_id)s and delivered
                 and started_at > now() - make_interval(secs => %(window)s)) as recent_success,
       exists (select 1 from pgsink.lanes
               where sink_id = %(sink_id)s and lane <> %(lane)s and failures > 0) as others_failing

-- name: lease_parked_groups
with pending as (
    select coalesce((select sum(in_flight) from pgsink.lanes where sink_id = %(sink_id)s), 0)
         + coalesce((select sum(in_flight) from pgsink.parked_groups where sink_id = %(sink_id)s), 0) as n
),
candidates as (
    select g.group_key, g.in_flight, g.next_attempt_at
    from pgsink.parked_groups g
    where g.sink_id = %(sink_id)s and g.next_attempt_at <= now()
      and (g.lease_expires is null or g.lease_expires < now())
    order by g.next_attempt_at, g.group_key
    limit %(max_groups)s
    for update of g skip locked
),
granted as (
    -- never less than what the group already holds (see lease_lanes)
    select c.group_key,
           least(%(batch_size)s::bigint, greatest(c.in_flight::bigint,
                 %(max_ack_pending)s::bigint - p.n + c.in_flight
                 - coalesce(sum(%(batch_size)s::bigint - c.in_flight)
                            over (order by c.next_attempt_at, c.group_key
                                  rows between unbounded preceding and 1 preceding), 0))) as room
    from candidates c cross join pending p
)
update pgsink.parked_groups g
set lease_owner = %(owner)s,
    lease_expires = now() + make_interval(secs => %(lease_seconds)s),
    in_flight = r.room
from granted r
where g.sink_id = %(sink_id)s and g.group_key = r.group_key and r.room > 0
returning g.group_key, g.lane, g.attempts, g.in_flight

-- name: read_parked_batch
select b.id, b.group_key, b.action, b.commit_lsn, b.commit_idx,
       to_char(b.committed_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as commit_timestamp,
       coalesce(c.source_table_schema, b.payload ->> 'table_schema') as table_schema,
       coalesce(c.source_table_name, b.payload ->> 'table_name') as table_name,
       coalesce(c.record, b.payload -> 'record')::text as record,
       c.changes::text as changes,
       c.transaction_annotations::text as transaction_annotations,
       b.payload ->> 'backfill_id' as backfill_id,
       coalesce(c.record_pk, b.payload ->> 'record_pk') as record_pk,
       true as group_parked,
       false as group_blocked,
       b.attempts
from (
    select pm.id, pm.group_key, pm.action, pm.commit_lsn, pm.commit_idx, pm.committed_at,
           pm.payload, pm.attempts
    from pgsink.parked_messages pm
    where pm.sink_id = %(sink_id)s and pm.group_key = %(group_key)s and pm.state = 'parked'
      and exists (select 1 from pgsink.parked_groups g  -- fenced: only while we hold the group
                  where g.sink_id = pm.sink_id and g.group_key = pm.group_key and g.lease_owner = %(owner)s)
    order by pm.id
    limit %(limit)s
) b
left join pgsink.changes c
       on b.action <> 'read'
      and c.committed_at = b.committed_at and c.source_id = %(source_id)s
      and c.commit_lsn = b.commit_lsn and c.commit_idx = b.commit_idx
order by b.id

-- name: ack_parked
with grp as (
    update pgsink.parked_groups
    set attempts = 0, in_flight = 0, last_error = null, next_attempt_at = now(),
        lease_owner = null, lease_expires = null
    where sink_id = %(sink_id)s and group_key = %(group_key)s and lease_owner = %(owner)s
    returning sink_id, group_key, lane
),
done as (
    delete from pgsink.parked_messages pm
    using grp
    where pm.sink_id = grp.sink_id and pm.id = any(%(ids)s::bigint[]) and pm.state = 'parked'
),
attempt as (
    insert into pgsink.attempts
        (sink_id, lane, group_key, message_ids, started_at, duration_ms, http_status, response_body,
         error, delivered)
    select grp.sink_id, grp.lane, grp.group_key, %(ids)s::bigint[], %(started_at)s, %(duration_ms)s,
           %(http_status)s, %(response_body)s, null, true
    from grp
)
select count(*) from grp

-- name: fail_parked
-- attempts + 1 on the group and on the attempted messages; a message past
-- max_retry_count is discarded (kept, queryable) and the group moves on
-- (moved_on: its backoff starts again for the next message).
with grp as (
    update pgsink.parked_groups
    set attempts = case when %(moved_on)s then 0 else attempts + 1 end,
        next_attempt_at = now() + make_interval(secs => %(delay)s),
        last_error = %(group_error)s, in_flight = %(in_flight)s, lease_owner = null, lease_expires = null
    where sink_id = %(sink_id)s and group_key = %(group_key)s and lease_owner = %(owner)s
    returning sink_id, group_key, lane
),
msgs as (
    update pgsink.parked_messages pm
    set attempts = pm.attempts + 1,
        state = case when %(max_retry_count)s::int is not null
                      and pm.attempts + 1 > %(max_retry_count)s::int then 'discarded' else pm.state end,
        discarded_at = case when %(max_retry_count)s::int is not null
                             and pm.attempts + 1 > %(max_retry_count)s::int then now() end
    from grp
    where pm.sink_id = grp.sink_id and pm.id = any(%(ids)s::bigint[]) and pm.state = 'parked'
),
attempt as (
    insert into pgsink.attempts
        (sink_id, lane, group_key, message_ids, started_at, duration_ms, http_status, response_body,
         error, delivered)
    select grp.sink_id, grp.lane, grp.group_key, %(ids)s::bigint[], %(started_at)s, %(duration_ms)s,
           %(http_status)s, %(response_body)s, %(error)s, false
    from grp
)
select count(*) from grp

-- name: discard_parked
-- Parked messages that cannot be sent any more (their change was pruned).
update pgsink.parked_messages
set state = 'discarded', discarded_at = now()
where sink_id = %(sink_id)s and id = any(%(ids)s::bigint[]) and state = 'parked'

-- name: unpark_groups
-- Groups the lane found drained are delivered normally again: their rows go.
-- Run after advance_lane, in its transaction, as a statement of its own: the
-- lane row is locked by then, so this snapshot sees any retry_message that
-- parked a message of the group again (it locks the lane row first).
delete from pgsink.parked_groups g
where g.sink_id = %(sink_id)s and g.group_key = any(%(unpark_keys)s::text[])
  and (g.lease_owner is null or g.lease_expires < now())  -- a retrier holding it drops it itself
  and not exists (select 1 from pgsink.parked_messages pm
                  where pm.sink_id = g.sink_id and pm.group_key = g.group_key and pm.state = 'parked')

-- name: lock_lane_shared
-- Taken (in its own statement) before dropping a drained parked group: it
-- waits for an ack of the lane in progress, so the drop's fresh snapshot sees
-- any message that ack parked behind the group.
select 1 from pgsink.lanes where sink_id = %(sink_id)s and lane = %(lane)s for share

-- name: drop_drained_group
-- Only a group we hold (owner), or nobody holds (owner null): never one that
-- another retrier leased meanwhile and is about to read.
delete from pgsink.parked_groups g
where g.sink_id = %(sink_id)s and g.group_key = %(group_key)s
  and (g.lease_owner is not distinct from %(owner)s::text or g.lease_expires < now())
  and not exists (select 1 from pgsink.parked_messages pm
                  where pm.sink_id = g.sink_id and pm.group_key = g.group_key and pm.state = 'parked')

-- name: release_parked_group
update pgsink.parked_groups
set lease_owner = null, lease_expires = null,
    in_flight = case when attempts > 0 then in_flight else 0 end
where sink_id = %(sink_id)s and group_key = %(group_key)s and lease_owner = %(owner)s

-- name: renew_lane_leases
-- Extends the leases this owner still holds; returns the others, with whether another owner
-- holds them now (else the lease ended: released by its own task as it finished, or taken by
-- another worker after it expired and released again). A lane row locked meanwhile (an ack in
-- progress, a retry_message left open in someone's transaction) is renewed next time: waiting
-- for it would hold up every other renewal until all those leases expired.
with held as (
    select * from unnest(%(sink_ids)s::uuid[], %(lanes)s::smallint[]) as h(sink_id, lane)
), free as (
    select l.sink_id, l.lane
    from pgsink.lanes l join held h on l.sink_id = h.sink_id and l.lane = h.lane
    where l.lease_owner = %(owner)s
    for no key update of l skip locked
), renewed as (
    update pgsink.lanes l
    set lease_expires = now() + make_interval(secs => %(lease_seconds)s)
    from free f
    where l.sink_id = f.sink_id and l.lane = f.lane
    returning l.sink_id
)
select l.sink_id, l.lane, l.lease_owner is not null
from pgsink.lanes l join held h on l.sink_id = h.sink_id and l.lane = h.lane
where l.lease_owner is distinct from %(owner)s

-- name: renew_group_leases
-- As renew_lane_leases, for parked groups.
with held as (
    select * from unnest(%(sink_ids)s::uuid[], %(group_keys)s::text[]) as h(sink_id, group_key)
), free as (
    select g.sink_id, g.group_key
    from pgsink.parked_groups g join held h on g.sink_id = h.sink_id and g.group_key = h.group_key
    where g.lease_owner = %(owner)s
    for no key update of g skip locked
), renewed as (
    update pgsink.parked_groups g
    set lease_expires = now() + make_interval(secs => %(lease_seconds)s)
    from free f
    where g.sink_id = f.sink_id and g.group_key = f.group_key
    returning g.sink_id
)
select g.sink_id, g.group_key, g.lease_owner is not null
from pgsink.parked_groups g join held h on g.sink_id = h.sink_id and g.group_key = h.group_key
where g.lease_owner is distinct from %(owner)s

-- name: release_lane_leases
update pgsink.lanes
set lease_owner = null, lease_expires = null,
    in_flight = case when failures > 0 then in_flight else 0 end
where sink_id = any(%(sink_ids)s::uuid[]) and lease_owner = %(owner)s

-- name: release_group_leases
update pgsink.parked_groups
set lease_owner = null, lease_expires = null,
    in_flight = case when attempts > 0 then in_flight else 0 end
where sink_id = any(%(sink_ids)s::uuid[]) and lease_owner = %(owner)s

-- name: prune_attempts
with doomed as (
    select id from pgsink.attempts
    where started_at < %(before)s
    order by started_at
    limit %(chunk)s
)
delete from pgsink.attempts a using doomed where a.id = doomed.id
