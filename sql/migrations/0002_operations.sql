-- pgsink state schema, version 2: the SQL interface to inspect and repair.
--
-- Views: pgsink.sink_status (one row per sink: state, lag, rate, failures),
-- pgsink.message_states (every message not yet delivered: pending, in flight,
-- failing, parked or discarded, with its last attempt) and pgsink.attempt_log
-- (every HTTP attempt).  Functions: retry_group, retry_message, discard,
-- pause_sink, resume_sink and replay.  Functions take a sink by name (or id
-- as text) and raise an error that says what to do when it does not exist.

-- ---------------------------------------------------------------- helpers

-- The sink named p_sink (or whose id is p_sink), or an error.
create function pgsink.sink_by_name(p_sink text) returns pgsink.sinks
language plpgsql stable
as $$
declare
    s pgsink.sinks;
begin
    select * into s from pgsink.sinks where name = p_sink or id::text = p_sink;
    if not found then
        raise exception 'sink % does not exist', quote_literal(p_sink)
            using errcode = 'no_data_found',
                  hint = 'List the sinks with: select name from pgsink.sinks';
    end if;
    return s;
end
$$;

-- The group key capture gives a change, for a sink: "<schema>.<table>:<key>"
-- where key is the group_column_names values of the table's options (strings
-- as is, other values as JSON, comma-joined) or else the primary key
-- (record_pk); "<schema>.<table>" for a table without a primary key; null
-- when the sink's message_grouping is off.  The twin of
-- pgsink.engine.capture.SourceReader._group_key.
create function pgsink.change_group_key(
    p_sink pgsink.sinks, p_schema text, p_table text, p_record_pk text, p_record jsonb)
returns text
language sql stable
as $$
    select case
        when not p_sink.message_grouping then null
        when opt.cols is not null then
            p_schema || '.' || p_table || ':' || (
                select string_agg(
                           case jsonb_typeof(p_record -> u.col)
                               when 'string' then p_record ->> u.col
                               else coalesce((p_record -> u.col)::text, 'null')
                           end, ',' order by u.ord)
                from jsonb_array_elements_text(opt.cols) with ordinality as u(col, ord))
        when p_record_pk is not null then p_schema || '.' || p_table || ':' || p_record_pk
        else p_schema || '.' || p_table
    end
    from (select (
        select t -> 'group_column_names'
        from jsonb_array_elements(p_sink.table_options) t
        where (case when position('.' in t ->> 'name') > 0 then t ->> 'name'
                    else 'public.' || (t ->> 'name') end) = p_schema || '.' || p_table
          and jsonb_typeof(t -> 'group_column_names') = 'array'
          and jsonb_array_length(t -> 'group_column_names') > 0
        limit 1) as cols) opt
$$;

-- Whether a sink takes changes of schema.table (its include/exclude lists):
-- the twin of pgsink.engine.model.Sink.matches_table.
create function pgsink.sink_matches_table(p_sink pgsink.sinks, p_schema text, p_table text)
returns boolean
language sql immutable
as $$
    select (p_sink.include_schemas is null or p_schema = any(p_sink.include_schemas))
       and (p_sink.exclude_schemas is null or not p_schema = any(p_sink.exclude_schemas))
       and (p_sink.include_tables is null or p_schema || '.' || p_table = any(p_sink.include_tables))
       and (p_sink.exclude_tables is null or not p_schema || '.' || p_table = any(p_sink.exclude_tables))
$$;

-- Every lane of a sink with its cursor: the lanes rows, and the lanes a
-- worker has not created rows for yet (cursor 0).
create function pgsink.sink_lanes(p_sink pgsink.sinks)
returns table (lane smallint, delivered_id bigint, failures integer, in_flight integer,
               lease_expires timestamptz)
language sql stable
as $$
    select coalesce(l.lane, g.lane)::smallint, coalesce(l.delivered_id, 0), coalesce(l.failures, 0),
           coalesce(l.in_flight, 0), l.lease_expires
    from (select generate_series(0, p_sink.lane_count - 1)::smallint as lane) g
    full join (select * from pgsink.lanes where sink_id = p_sink.id) l on l.lane = g.lane
$$;

-- ---------------------------------------------------------------- views

-- One row per sink.  lag_messages counts messages not delivered yet (after
-- their lane's cursor, plus parked ones); lag_seconds is the age of the
-- oldest of them (by commit time); delivered_per_second is measured over the
-- last minute of attempts; failing_groups are parked groups still holding
-- messages; failing_lanes are lanes whose head batch is backing off.
create view pgsink.sink_status as
select s.id as sink_id,
       s.name as sink,
       src.name as source,
       s.status as state,
       q.pending + pk.parked as lag_messages,
       coalesce(extract(epoch from now() - least(q.oldest, pk.oldest)), 0)::float8 as lag_seconds,
       q.pending as pending_messages,
       q.in_flight as in_flight_messages,
       pk.parked as parked_messages,
       pk.discarded as discarded_messages,
       (r.delivered / 60.0)::float8 as delivered_per_second,
       r.delivered as delivered_last_minute,
       r.failed as failed_attempts_last_minute,
       pk.groups as failing_groups,
       q.failing_lanes,
       e.error as last_error,
       e.at as last_error_at
from pgsink.sinks s
join pgsink.sources src on src.id = s.source_id
cross join lateral (
    select count(m.id) as pending,
           min(m.committed_at) as oldest,
           (select coalesce(sum(l2.in_flight), 0) from pgsink.lanes l2 where l2.sink_id = s.id)
         + (select coalesce(sum(g.in_flight), 0) from pgsink.parked_groups g where g.sink_id = s.id)
               as in_flight,
           (select count(*) from pgsink.lanes l3 where l3.sink_id = s.id and l3.failures > 0) as failing_lanes
    from pgsink.sink_lanes(s) l
    join pgsink.messages m on m.sink_id = s.id and m.lane = l.lane and m.id > l.delivered_id
) q
cross join lateral (
    select count(*) filter (where pm.state = 'parked') as parked,
           count(*) filter (where pm.state = 'discarded') as discarded,
           min(pm.committed_at) filter (where pm.state = 'parked') as oldest,
           count(distinct pm.group_key) filter (where pm.state = 'parked') as groups
    from pgsink.parked_messages pm
    where pm.sink_id = s.id
) pk
cross join lateral (
    select coalesce(sum(cardinality(a.message_ids)) filter (where a.delivered), 0) as delivered,
           count(*) filter (where not a.delivered) as failed
    from pgsink.attempts a
    where a.sink_id = s.id and a.started_at > now() - interval '1 minute'
) r
left join lateral (
    select coalesce(a.error, 'HTTP ' || a.http_status
                    || coalesce(': ' || left(a.response_body, 200), '')) as error,
           a.started_at as at
    from pgsink.attempts a
    where a.sink_id = s.id and not a.delivered
    order by a.started_at desc
    limit 1
) e on true;

comment on view pgsink.sink_status is
    'One row per sink: state, lag (messages, seconds), delivery rate over the last minute, failing groups, last error.';

-- Every message of a sink that is not delivered yet.  state:
--   pending    after its lane's cursor, not leased
--   in_flight  leased by a worker, being posted
--   failing    in its lane's head batch, which failed and is backing off
--   parked     its group kept failing; retried on its own (see parked_groups)
--   discarded  gave up after max_retry_count (kept; pgsink.retry_message sends it again)
-- attempts counts failed attempts; last_* describe its latest attempt.
create view pgsink.message_states as
select s.name as sink,
       x.sink_id,
       x.id,
       x.lane,
       x.group_key,
       x.action,
       x.state,
       coalesce(c.source_table_schema, x.payload ->> 'table_schema') as table_schema,
       coalesce(c.source_table_name, x.payload ->> 'table_name') as table_name,
       coalesce(c.record_pk, x.payload ->> 'record_pk') as record_pk,
       x.commit_lsn,
       x.commit_idx,
       x.committed_at,
       x.attempts,
       x.since,
       a.started_at as last_attempt_at,
       a.http_status as last_http_status,
       a.error as last_error,
       left(a.response_body, 200) as last_response
from pgsink.sinks s
cross join lateral (
    select m.sink_id, m.id, m.lane, m.group_key, m.action,
           case when l.failures > 0 and m.rn <= l.in_flight then 'failing'
                when l.lease_expires > now() and m.rn <= l.in_flight then 'in_flight'
                else 'pending' end as state,
           m.commit_lsn, m.commit_idx, m.committed_at, m.payload,
           case when m.rn <= l.in_flight then l.failures else 0 end as attempts,
           m.enqueued_at as since
    from pgsink.sink_lanes(s) l
    cross join lateral (
        select mm.*, row_number() over (order by mm.id) as rn
        from pgsink.messages mm
        where mm.sink_id = s.id and mm.lane = l.lane and mm.id > l.delivered_id
    ) m
    union all
    select pm.sink_id, pm.id, pm.lane,
           case when pm.group_key like 'pgsink:message:%' then null else pm.group_key end,
           pm.action,
           case when pm.state = 'parked' and g.lease_expires > now() then 'in_flight' else pm.state end,
           pm.commit_lsn, pm.commit_idx, pm.committed_at, pm.payload, pm.attempts,
           coalesce(pm.discarded_at, pm.parked_at)
    from pgsink.parked_messages pm
    left join pgsink.parked_groups g on g.sink_id = pm.sink_id and g.group_key = pm.group_key
    where pm.sink_id = s.id
) x
left join pgsink.changes c
       on x.action <> 'read' and c.committed_at = x.committed_at and c.source_id = s.source_id
      and c.commit_lsn = x.commit_lsn and c.commit_idx = x.commit_idx
left join lateral (
    -- only messages that were attempted (keeps the view cheap on big queues)
    select at.started_at, at.http_status, at.error, at.response_body
    from pgsink.attempts at
    where (x.attempts > 0 or x.state in ('parked', 'discarded'))
      and at.sink_id = x.sink_id and x.id = any(at.message_ids)
    order by at.started_at desc
    limit 1
) a on true;

comment on view pgsink.message_states is
    'Messages not delivered yet: pending, in_flight, failing, parked or discarded, with their last attempt.';

-- Every attempt (one HTTP request for a batch), newest first when ordered by id desc.
create view pgsink.attempt_log as
select a.id,
       s.name as sink,
       a.sink_id,
       a.lane,
       a.group_key,
       a.message_ids,
       cardinality(a.message_ids) as message_count,
       a.started_at,
       a.duration_ms,
       a.http_status,
       case when a.delivered then 'delivered'
            when a.http_status is null then 'error'
            else 'failed' end as status,
       left(a.response_body, 200) as response_excerpt,
       a.response_body,
       a.error,
       a.delivered
from pgsink.attempts a
join pgsink.sinks s on s.id = a.sink_id;

comment on view pgsink.attempt_log is
    'One row per delivery attempt: status (delivered, failed, error), HTTP status, response excerpt, error, duration.';

-- ---------------------------------------------------------------- repair

-- Retry a parked group now (its backoff is skipped; its attempt count is kept,
-- so a new failure backs off further).  Returns the group's parked message count.
create function pgsink.retry_group(p_sink text, p_group_key text) returns integer
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    n integer;
begin
    update pgsink.parked_groups set next_attempt_at = now()
    where sink_id = s.id and group_key = p_group_key;
    if not found then
        raise exception 'group % of sink % is not parked', quote_literal(p_group_key), quote_literal(s.name)
            using errcode = 'no_data_found',
                  hint = 'See the parked groups with: select distinct group_key from pgsink.message_states'
                         ' where sink = ''' || s.name || ''' and state = ''parked''';
    end if;
    select count(*) into n from pgsink.parked_messages
    where sink_id = s.id and group_key = p_group_key and state = 'parked';
    perform pg_notify('pgsink_messages', s.id::text);
    return n;
end
$$;

-- Send a discarded message again: it is parked again, due now, in its group
-- (delivered in id order with the group's other parked messages; later
-- messages of the group wait behind it).
create function pgsink.retry_message(p_sink text, p_id bigint) returns void
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    pm pgsink.parked_messages;
begin
    update pgsink.parked_messages
    set state = 'parked', attempts = 0, discarded_at = null
    where sink_id = s.id and id = p_id and state = 'discarded'
    returning * into pm;
    if not found then
        raise exception 'message % of sink % is not discarded', p_id, quote_literal(s.name)
            using errcode = 'no_data_found',
                  hint = 'Only discarded messages can be retried; see select id, state from'
                         ' pgsink.message_states where sink = ''' || s.name || '''';
    end if;
    insert into pgsink.parked_groups (sink_id, group_key, lane, next_attempt_at)
    values (s.id, pm.group_key, pm.lane, now())
    on conflict (sink_id, group_key) do update set next_attempt_at = now();
    perform pg_notify('pgsink_messages', s.id::text);
end
$$;

-- Give up on a parked message: it is kept as discarded (retry_message sends
-- it again) and its group moves on to its next message.
create function pgsink.discard(p_sink text, p_id bigint) returns void
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
begin
    update pgsink.parked_messages set state = 'discarded', discarded_at = now()
    where sink_id = s.id and id = p_id and state = 'parked';
    if not found then
        raise exception 'message % of sink % is not parked', p_id, quote_literal(s.name)
            using errcode = 'no_data_found',
                  hint = 'Only parked messages can be discarded (a pending message is delivered in order;'
                         ' pause the sink to hold it).';
    end if;
    perform pg_notify('pgsink_messages', s.id::text);
end
$$;

-- Stop delivering a sink (capture keeps enqueueing); workers pick it up at once.
create function pgsink.pause_sink(p_name text) returns void
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_name);
begin
    update pgsink.sinks set status = 'paused', updated_at = clock_timestamp() where id = s.id;
    perform pg_notify('pgsink_config', 'sink:' || s.name);
end
$$;

create function pgsink.resume_sink(p_name text) returns void
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_name);
begin
    update pgsink.sinks set status = 'active', updated_at = clock_timestamp() where id = s.id;
    perform pg_notify('pgsink_config', 'sink:' || s.name);
end
$$;

-- Re-enqueue the retained changes of a sink committed in [p_since, p_until)
-- (optionally one table, "schema.table" or "table" meaning public, and one
-- action), in their original commit order, with their original commit_lsn
-- and commit_idx, so their idempotency keys are unchanged.  Only changes the
-- sink takes (its tables and actions) are replayed.  Returns how many.
--
-- Like capture, it takes the sink's enqueue lock before allocating message
-- ids, so the replayed messages come after every message already committed
-- and before any captured later: per-group order holds with live traffic.
create function pgsink.replay(
    p_sink text, p_since timestamptz, p_until timestamptz default null,
    p_table text default null, p_action text default null)
returns integer
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    v_schema text;
    v_table text;
    ids bigint[];
    lsns bigint[];
    idxs integer[];
    ats timestamptz[];
    actions text[];
    keys text[];
begin
    if p_since is null then
        raise exception 'replay needs a start time (since)' using errcode = 'invalid_parameter_value';
    end if;
    if p_action is not null and p_action not in ('insert', 'update', 'delete') then
        raise exception 'unknown action %', quote_literal(p_action)
            using errcode = 'invalid_parameter_value', hint = 'Use insert, update or delete.';
    end if;
    if p_table is not null then
        v_schema := coalesce(nullif(split_part(p_table, '.', 1), p_table), 'public');
        v_table := case when position('.' in p_table) > 0 then substr(p_table, position('.' in p_table) + 1)
                        else p_table end;
    end if;
    perform pgsink.lock_sinks_for_enqueue(array[s.id]);
    -- ids are taken in commit order, after the lock (the subquery's order
    -- feeds nextval row by row)
    select coalesce(array_agg(r.id order by r.id), '{}'), array_agg(r.commit_lsn order by r.id),
           array_agg(r.commit_idx order by r.id), array_agg(r.committed_at order by r.id),
           array_agg(r.action order by r.id), array_agg(r.group_key order by r.id)
    into ids, lsns, idxs, ats, actions, keys
    from (
        select nextval('pgsink.message_id_seq') as id, o.*
        from (
            select c.commit_lsn, c.commit_idx, c.committed_at, c.action,
                   pgsink.change_group_key(s, c.source_table_schema, c.source_table_name, c.record_pk, c.record)
                       as group_key
            from pgsink.changes c
            where c.source_id = s.source_id
              and c.committed_at >= p_since
              and (p_until is null or c.committed_at < p_until)
              and c.action = any(s.actions)
              and (p_action is null or c.action = p_action)
              and (p_table is null or (c.source_table_schema = v_schema and c.source_table_name = v_table))
              and pgsink.sink_matches_table(s, c.source_table_schema, c.source_table_name)
            order by c.commit_lsn, c.commit_idx
        ) o
    ) r;
    if cardinality(ids) = 0 then
        return 0;
    end if;
    perform pgsink.ensure_partitions(null, null, ids[1], ids[cardinality(ids)]);
    insert into pgsink.messages (id, sink_id, lane, group_key, action, commit_lsn, commit_idx, committed_at)
    select u.id, s.id,
           case when u.group_key is null then (u.id % s.lane_count)::smallint
                else pgsink.lane_for(u.group_key, s.lane_count) end,
           u.group_key, u.action, u.commit_lsn, u.commit_idx, u.committed_at
    from unnest(ids, lsns, idxs, ats, actions, keys)
        as u(id, commit_lsn, commit_idx, committed_at, action, group_key);
    perform pg_notify('pgsink_messages', s.id::text);
    return cardinality(ids);
end
$$;

-- ---------------------------------------------------------------- backfills

-- Start a backfill of one table for a sink: full (primary key order) or
-- partial (rows whose p_sort_column >= p_start_position).  Any worker with
-- the backfill role picks it up.  Returns the job id.
create function pgsink.start_backfill(
    p_sink text, p_table text, p_sort_column text default null, p_start_position jsonb default null,
    p_page_size integer default 1000, p_max_page_ms integer default 5000)
returns uuid
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    v_id uuid;
    v_schema text;
    v_table text;
begin
    if (p_sort_column is null) <> (p_start_position is null) then
        raise exception 'a partial backfill needs both a sort column and a start position'
            using errcode = 'invalid_parameter_value',
                  hint = 'Give both (sort_column => ''updated_at'', start_position => ''"2026-01-01"'') or neither.';
    end if;
    v_schema := case when position('.' in p_table) > 0 then split_part(p_table, '.', 1) else 'public' end;
    v_table := case when position('.' in p_table) > 0 then substr(p_table, position('.' in p_table) + 1)
                    else p_table end;
    if not pgsink.sink_matches_table(s, v_schema, v_table) then
        raise exception 'table %.% is not one of the tables of sink %', v_schema, v_table, quote_literal(s.name)
            using errcode = 'invalid_parameter_value',
                  hint = 'Backfill a table the sink streams (see its include/exclude tables and schemas).';
    end if;
    insert into pgsink.backfills (sink_id, table_schema, table_name, sort_column, start_position,
                                  page_size, max_page_ms)
    values (s.id, v_schema, v_table, p_sort_column, p_start_position, p_page_size, p_max_page_ms)
    returning id into v_id;
    perform pg_notify('pgsink_backfills', v_id::text);
    return v_id;
end
$$;

-- Stop a backfill: the worker running it stops after its current page
-- (pages already enqueued are delivered).  Returns false if it had ended.
create function pgsink.cancel_backfill(p_id uuid) returns boolean
language sql
as $$
    update pgsink.backfills set state = 'cancelled', completed_at = now(), lease_owner = null
    where id = p_id and state in ('pending', 'running')
    returning true
$$;

-- Backfills with their progress: rows done, estimated total, rate, ETA.
create view pgsink.backfill_progress as
select b.id,
       s.name as sink,
       b.table_schema || '.' || b.table_name as "table",
       b.state,
       b.rows_done,
       greatest(b.rows_estimate, b.rows_done) as rows_estimate,
       case when b.rows_estimate > 0
            then least(100.0, round(100.0 * b.rows_done / b.rows_estimate, 1)) end as percent,
       case when b.started_at is not null and coalesce(b.completed_at, now()) > b.started_at
            then (b.rows_done / extract(epoch from coalesce(b.completed_at, now()) - b.started_at))::float8
       end as rows_per_second,
       case when b.state = 'running' and b.rows_done > 0 and b.rows_estimate > b.rows_done
            then ((b.rows_estimate - b.rows_done)
                  * extract(epoch from now() - b.started_at) / b.rows_done)::float8
       end as eta_seconds,
       b.page_size,
       b.sort_column,
       b.start_position,
       b.cursor,
       b.lease_owner as worker,
       b.error,
       b.created_at,
       b.started_at,
       b.completed_at
from pgsink.backfills b
join pgsink.sinks s on s.id = b.sink_id;

comment on view pgsink.backfill_progress is
    'Backfills with progress: rows done, estimated total, percent, rows per second, ETA in seconds.';

-- Enqueue one page of a backfill as read messages, and store its cursor, in
-- the caller's transaction (which already holds the sink's enqueue lock and
-- has dropped the rows a newer captured change supersedes; see
-- pgsink.engine.backfill).  p_records, p_record_pks and p_group_keys are
-- JSON arrays of the same length (group keys as capture computes them; null
-- when grouping is off).  Ids are taken here, after the lock, in row order.
-- Fenced on the job's lease: raises if another worker owns the job now or
-- it was cancelled, so the page rolls back.
create function pgsink.enqueue_backfill_page(
    p_backfill_id uuid, p_owner text, p_cursor jsonb, p_rows_read integer, p_page_size integer,
    p_lease_seconds float8, p_read_at timestamptz, p_records jsonb, p_record_pks jsonb, p_group_keys jsonb)
returns integer
language plpgsql
as $$
declare
    b pgsink.backfills;
    s pgsink.sinks;
    n integer := jsonb_array_length(p_records);
    ids bigint[];
begin
    update pgsink.backfills
    set cursor = p_cursor, rows_done = rows_done + p_rows_read, page_size = p_page_size,
        lease_expires = now() + make_interval(secs => p_lease_seconds)
    where id = p_backfill_id and lease_owner = p_owner and state = 'running'
    returning * into b;
    if not found then
        raise exception 'backfill % is no longer held by %', p_backfill_id, p_owner
            using errcode = 'lock_not_available';
    end if;
    if n = 0 then
        return 0;
    end if;
    select * into s from pgsink.sinks where id = b.sink_id;
    select array_agg(x.id order by x.ord) into ids
    from (select nextval('pgsink.message_id_seq') as id, o.ord
          from (select g as ord from generate_series(1, n) g order by g) o) x;
    perform pgsink.ensure_partitions(null, null, ids[1], ids[n]);
    insert into pgsink.messages (id, sink_id, lane, group_key, action, commit_lsn, commit_idx,
                                 committed_at, payload)
    select i.id, s.id,
           case when k.key is null then (i.id % s.lane_count)::smallint
                else pgsink.lane_for(k.key, s.lane_count) end,
           k.key, 'read', 0, 0, p_read_at,
           jsonb_build_object('backfill_id', b.id::text, 'table_schema', b.table_schema,
                              'table_name', b.table_name, 'record_pk', pk.pk, 'record', r.rec)
    from unnest(ids) with ordinality as i(id, ord)
    join jsonb_array_elements(p_records) with ordinality as r(rec, ord) on r.ord = i.ord
    join jsonb_array_elements_text(p_record_pks) with ordinality as pk(pk, ord) on pk.ord = i.ord
    join jsonb_array_elements_text(p_group_keys) with ordinality as k(key, ord) on k.ord = i.ord;
    perform pg_notify('pgsink_messages', s.id::text);
    return n;
end
$$;
