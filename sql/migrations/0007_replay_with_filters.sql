-- pgsink state schema, version 7: replay keeps to what the sink takes.
--
-- pgsink.replay re-enqueued every retained change of the sink's tables and
-- actions, also the ones its filters had kept from it at capture time. The
-- filters (column filters, SQL compiled to Python, Python functions) run in
-- Python, so `pgsink replay` now picks the changes that pass them and hands
-- their positions to pgsink.replay_changes. pgsink.replay itself refuses a
-- sink that has filters, saying so, instead of sending what it never took.

-- Re-enqueue the given retained changes of the sink's source (positions as
-- three parallel arrays), in commit order, with their original positions (so
-- their original idempotency keys) and their groups, under the sink's
-- enqueue lock: one contiguous block of ids. Returns how many.
create function pgsink.replay_changes(
    p_sink text, p_commit_lsns bigint[], p_commit_idxs integer[], p_committed_ats timestamptz[])
returns integer
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    ids bigint[];
    lsns bigint[];
    idxs integer[];
    ats timestamptz[];
    actions text[];
    keys text[];
begin
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
            from unnest(p_commit_lsns, p_commit_idxs, p_committed_ats) as p(commit_lsn, commit_idx, committed_at)
            join pgsink.changes c
              on c.committed_at = p.committed_at and c.source_id = s.source_id
             and c.commit_lsn = p.commit_lsn and c.commit_idx = p.commit_idx
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

-- The retained changes a replay of the sink considers, before its filters:
-- its source, the window, its actions and tables, optionally one table and
-- one action, in commit order.
create function pgsink.replay_candidates(
    p_sink text, p_since timestamptz, p_until timestamptz default null,
    p_table text default null, p_action text default null)
returns setof pgsink.changes
language plpgsql stable
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    v_schema text;
    v_table text;
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
    return query
        select c.*
        from pgsink.changes c
        where c.source_id = s.source_id
          and c.committed_at >= p_since
          and (p_until is null or c.committed_at < p_until)
          and c.action = any(s.actions)
          and (p_action is null or c.action = p_action)
          and (p_table is null or (c.source_table_schema = v_schema and c.source_table_name = v_table))
          and pgsink.sink_matches_table(s, c.source_table_schema, c.source_table_name)
        order by c.commit_lsn, c.commit_idx;
end
$$;

-- Re-enqueue the retained changes of a window for a sink (see
-- replay_candidates), for a sink without filters; `pgsink replay` applies a
-- sink's filters first.
create or replace function pgsink.replay(
    p_sink text, p_since timestamptz, p_until timestamptz default null,
    p_table text default null, p_action text default null)
returns integer
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    lsns bigint[];
    idxs integer[];
    ats timestamptz[];
begin
    if s.filters <> '[]'::jsonb or s.filter_sql is not null or s.filter_function is not null then
        raise exception 'sink % has filters, and they run in Python', quote_literal(s.name)
            using errcode = 'feature_not_supported',
                  hint = 'Replay it with `pgsink replay --sink ' || s.name || ' --since ...`, which applies'
                         ' the filters and enqueues the changes that pass them.';
    end if;
    select coalesce(array_agg(c.commit_lsn), '{}'), coalesce(array_agg(c.commit_idx), '{}'),
           coalesce(array_agg(c.committed_at), '{}')
    into lsns, idxs, ats
    from pgsink.replay_candidates(p_sink, p_since, p_until, p_table, p_action) c;
    return pgsink.replay_changes(p_sink, lsns, idxs, ats);
end
$$;
