-- pgsink state schema, version 1.
--
-- Config (sources, http_endpoints, sinks), the retention log (changes), the
-- append-only per-sink queue (messages, split into lanes), lane cursors,
-- parked groups, the attempt log, source checkpoints and backfill jobs.
--
-- The success path of delivery never updates a row per message: a lane's
-- cursor moves past a whole batch in one UPDATE. See DESIGN.md, "Queue design".

create schema if not exists pgsink;

-- ---------------------------------------------------------------- config

create table pgsink.sources (
    id                    uuid primary key default gen_random_uuid(),
    name                  text not null unique,
    hostname              text not null,
    port                  integer not null default 5432 check (port between 1 and 65535),
    database              text not null,
    username              text not null,
    password_encrypted    bytea,            -- AES-GCM, key from PGSINK_SECRET_KEY
    sslmode               text not null default 'prefer',
    slot_name             text not null,
    create_slot           boolean not null default false,
    publication_name      text not null,
    create_publication    boolean not null default false,
    publication_init_sql  text,
    decoder               text not null default 'pgoutput'
                              check (decoder in ('pgoutput', 'wal2json')),
    retention             interval not null default interval '7 days',
    annotations           jsonb not null default '{}'::jsonb,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now()
);

create table pgsink.http_endpoints (
    id                          uuid primary key default gen_random_uuid(),
    name                        text not null unique,
    url                         text not null,
    headers                     jsonb not null default '{}'::jsonb,  -- static, shown
    encrypted_headers           bytea,  -- AES-GCM of a JSON object, never shown
    created_at                  timestamptz not null default now(),
    updated_at                  timestamptz not null default now()
);

create table pgsink.sinks (
    id                  uuid primary key default gen_random_uuid(),
    name                text not null unique,
    source_id           uuid not null references pgsink.sources (id),
    http_endpoint_id    uuid not null references pgsink.http_endpoints (id),
    http_endpoint_path  text not null default '',
    status              text not null default 'active'
                            check (status in ('active', 'paused', 'disabled')),
    include_schemas     text[],
    exclude_schemas     text[],
    include_tables      text[],     -- "schema.table"
    exclude_tables      text[],
    actions             text[] not null default '{insert,update,delete}',
    message_grouping    boolean not null default true,
    -- per-table options, as in sequin.yaml: [{"name": "public.orders", "group_column_names": ["account_id"]}]
    table_options       jsonb not null default '[]'::jsonb,
    batch               boolean not null default true,
    batch_size          integer not null default 1 check (batch_size between 1 and 10000),
    batch_timeout_ms    integer not null default 50 check (batch_timeout_ms >= 0),
    request_timeout_ms  integer not null default 30000 check (request_timeout_ms > 0),
    max_ack_pending     integer not null default 10000 check (max_ack_pending > 0),
    max_retry_count     integer check (max_retry_count >= 0),  -- null: retry forever
    annotations         jsonb not null default '{}'::jsonb,
    lane_count          integer not null default 64 check (lane_count between 1 and 1024),
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    check (batch or batch_size = 1)
);

-- ---------------------------------------------------------------- capture state

-- Where the reader of a source has durably ingested up to.  (commit_lsn,
-- commit_idx) is the last change written; a transaction is complete when
-- commit_idx = 2147483647.  ack_lsn is the end LSN of the last complete
-- transaction: the only position ever confirmed to the slot.
create table pgsink.source_checkpoints (
    source_id    uuid primary key references pgsink.sources (id) on delete cascade,
    commit_lsn   bigint not null default 0,
    commit_idx   integer not null default 2147483647,
    ack_lsn      bigint not null default 0,
    updated_at   timestamptz not null default now()
);

-- The retention log: one row per captured change, partitioned by commit day
-- and pruned by dropping whole partitions.  Column names follow Sequin's
-- change-retention table where they mean the same thing.
create table pgsink.changes (
    source_id               uuid not null,
    commit_lsn              bigint not null,
    commit_idx              integer not null,
    xid                     bigint not null,
    committed_at            timestamptz not null,
    source_table_oid        oid not null,
    source_table_schema     text not null,
    source_table_name       text not null,
    action                  text not null check (action in ('insert', 'update', 'delete')),
    record_pk               text,            -- primary key values, comma-joined
    record                  jsonb not null,  -- new row (old row for deletes)
    changes                 jsonb,           -- old values of changed columns, when known
    transaction_annotations jsonb,
    inserted_at             timestamptz not null default now(),
    primary key (committed_at, source_id, commit_lsn, commit_idx)
) partition by range (committed_at);

create index changes_row on pgsink.changes (source_id, source_table_oid, record_pk, commit_lsn desc);

-- ---------------------------------------------------------------- queue

create sequence pgsink.message_id_seq as bigint;

-- Append-only: one row per (sink, change) or (sink, backfilled row).  A
-- message's lane is a stable hash of its group key, so a group lives in one
-- lane and a lane's cursor delivers its groups in order.  Partitioned by id
-- range so that delivered history is dropped a partition at a time.
create table pgsink.messages (
    id            bigint not null default nextval('pgsink.message_id_seq'),
    sink_id       uuid not null,
    lane          smallint not null,
    group_key     text,            -- null when message_grouping is off
    action        text not null check (action in ('insert', 'update', 'delete', 'read')),
    commit_lsn    bigint not null,  -- with commit_idx and committed_at: the change
    commit_idx    integer not null,
    committed_at  timestamptz not null,
    payload       jsonb,           -- only for read (backfill) messages: the row itself
    enqueued_at   timestamptz not null default now(),
    primary key (sink_id, lane, id)
) partition by range (id);

-- A lane's cursor: everything in the lane with id <= delivered_id has been
-- delivered or parked.  Leased by one worker at a time.
create table pgsink.lanes (
    sink_id        uuid not null references pgsink.sinks (id) on delete cascade,
    lane           smallint not null,
    delivered_id   bigint not null default 0,
    lease_owner    text,
    lease_expires  timestamptz,
    in_flight      integer not null default 0,  -- messages leased and not yet acknowledged
    failures       integer not null default 0,  -- consecutive failed attempts of the head batch
    retry_at       timestamptz,
    last_error     text,
    primary key (sink_id, lane)
);

-- Groups whose head batch kept failing: they are delivered on their own,
-- with their own backoff, so the rest of the lane keeps flowing.
create table pgsink.parked_groups (
    sink_id          uuid not null references pgsink.sinks (id) on delete cascade,
    group_key        text not null,
    lane             smallint not null,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_error       text,
    lease_owner      text,
    lease_expires    timestamptz,
    in_flight        integer not null default 0,
    parked_at        timestamptz not null default now(),
    primary key (sink_id, group_key)
);

create index parked_groups_due on pgsink.parked_groups (sink_id, next_attempt_at);

-- Copies of parked messages, in order; discarded ones are kept, replayable.
create table pgsink.parked_messages (
    sink_id       uuid not null references pgsink.sinks (id) on delete cascade,
    id            bigint not null,
    lane          smallint not null,
    group_key     text not null,
    action        text not null,
    commit_lsn    bigint not null,
    commit_idx    integer not null,
    committed_at  timestamptz not null,
    payload       jsonb,
    state         text not null default 'parked' check (state in ('parked', 'discarded')),
    attempts      integer not null default 0,
    parked_at     timestamptz not null default now(),
    discarded_at  timestamptz,
    primary key (sink_id, id)
);

create index parked_messages_group on pgsink.parked_messages (sink_id, group_key, id)
    where state = 'parked';

-- One row per HTTP request (or per user-function failure).
create table pgsink.attempts (
    id             bigint generated always as identity primary key,
    sink_id        uuid not null references pgsink.sinks (id) on delete cascade,
    lane           smallint,
    group_key      text,          -- set when a parked group was attempted
    message_ids    bigint[] not null,
    started_at     timestamptz not null,
    duration_ms    integer not null,
    http_status    integer,
    response_body  text,          -- cut to a few KB
    error          text,          -- timeouts, connection errors, user-function errors
    delivered      boolean not null
);

create index attempts_sink_time on pgsink.attempts (sink_id, started_at desc);
create index attempts_started on pgsink.attempts (started_at);

-- ---------------------------------------------------------------- backfills

create table pgsink.backfills (
    id                  uuid primary key default gen_random_uuid(),
    sink_id             uuid not null references pgsink.sinks (id) on delete cascade,
    table_schema        text not null,
    table_name          text not null,
    state               text not null default 'pending'
                            check (state in ('pending', 'running', 'completed', 'cancelled', 'failed')),
    sort_column         text,          -- null: primary key order (full backfill)
    start_position      jsonb,         -- partial backfill: first sort value
    cursor              jsonb,         -- last key read; resumes here after a crash
    rows_done           bigint not null default 0,
    rows_estimate       bigint,
    page_size           integer not null default 1000,
    max_page_ms         integer not null default 5000,
    lease_owner         text,
    lease_expires       timestamptz,
    error               text,
    created_at          timestamptz not null default now(),
    started_at          timestamptz,
    completed_at        timestamptz
);

create index backfills_pending on pgsink.backfills (created_at) where state in ('pending', 'running');

-- ---------------------------------------------------------------- functions

-- The lane of a group key: the first 32 bits of its md5, modulo the lane count.
-- Computed identically in Python (pgsink.engine.queue.lane_for).
create function pgsink.lane_for(p_group_key text, p_lane_count integer) returns smallint
language sql immutable parallel safe
as $$
    select ((('x00000000' || substr(md5(p_group_key), 1, 8))::bit(64)::bigint) % p_lane_count)::smallint
$$;

-- Every transaction that appends to pgsink.messages first takes this lock
-- for each sink it writes to (in sink id order, to avoid deadlocks), and
-- allocates message ids only after.  Ids of one sink therefore commit in id
-- order, so a lane cursor never moves past an id that commits later.
create function pgsink.lock_sinks_for_enqueue(p_sink_ids uuid[]) returns void
language sql
as $$
    select count(pg_advisory_xact_lock(hashtext('pgsink.enqueue'), hashtext(s::text)))
    from (select distinct unnest(p_sink_ids) as s order by 1) ids
$$;

-- The start of a capture transaction, in one round trip: take the enqueue
-- locks of the sinks it writes to, then check that the source's checkpoint is
-- still where this reader left it (a fence: if another reader wrote since,
-- this one lost leadership and must not write).  Returns false on a mismatch.
create function pgsink.capture_begin(
    p_source_id uuid, p_sink_ids uuid[], p_commit_lsn bigint, p_commit_idx integer)
returns boolean
language plpgsql
as $$
begin
    perform pgsink.lock_sinks_for_enqueue(p_sink_ids);
    return exists (
        select 1 from pgsink.source_checkpoints
        where source_id = p_source_id and commit_lsn = p_commit_lsn and commit_idx = p_commit_idx
        for update);
end
$$;

-- Make sure the partitions exist for changes committed in [p_from, p_to]
-- (one per UTC day) and for message ids in [p_from_id, p_upto_id] (one per
-- 1M ids).  Called before writing, outside the write transaction's hot part.
-- Ranges that pruning already dropped are never passed again (ids only grow).
create function pgsink.ensure_partitions(
    p_from timestamptz, p_to timestamptz, p_from_id bigint, p_upto_id bigint)
returns void
language plpgsql
as $$
declare
    day date;
    part bigint;
    span constant bigint := 1000000;
begin
    perform pg_advisory_xact_lock(hashtext('pgsink.ensure_partitions'));
    if p_from is not null then
        day := (p_from at time zone 'UTC')::date;
        while day <= (coalesce(p_to, p_from) at time zone 'UTC')::date loop
            if to_regclass(format('pgsink.changes_%s', to_char(day, 'YYYYMMDD'))) is null then
                execute format(
                    'create table pgsink.%I partition of pgsink.changes for values from (%L) to (%L)',
                    'changes_' || to_char(day, 'YYYYMMDD'),
                    (day::timestamp at time zone 'UTC'),
                    ((day + 1)::timestamp at time zone 'UTC'));
            end if;
            day := day + 1;
        end loop;
    end if;
    if p_upto_id is not null then
        for part in (coalesce(p_from_id, p_upto_id) / span) .. (p_upto_id / span) loop
            if to_regclass(format('pgsink.messages_%s', lpad(part::text, 9, '0'))) is null then
                execute format(
                    'create table pgsink.%I partition of pgsink.messages for values from (%s) to (%s)',
                    'messages_' || lpad(part::text, 9, '0'), part * span, (part + 1) * span);
            end if;
        end loop;
    end if;
end
$$;
