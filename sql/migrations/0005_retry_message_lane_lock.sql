-- pgsink state schema, version 5: retry_message serialises with the lane.
--
-- Every statement that drops a parked group row decides "no parked message
-- left" from its snapshot. A retry_message committing meanwhile (a discarded
-- message parked again, its group row re-armed) was invisible to that
-- snapshot, so the drop went ahead and left the retried message parked with
-- no group row: never sent again. The lane row is the point they meet: the
-- lane's ack holds it while it unparks drained groups (in a statement of its
-- own, after the lane update), a retrier takes it FOR SHARE before dropping a
-- drained group, and now retry_message takes it first, so whichever comes
-- second sees the other's work in a fresh snapshot.

create or replace function pgsink.retry_message(p_sink text, p_id bigint) returns void
language plpgsql
as $$
declare
    s pgsink.sinks := pgsink.sink_by_name(p_sink);
    pm pgsink.parked_messages;
begin
    perform 1 from pgsink.lanes l
    where l.sink_id = s.id
      and l.lane = (select p.lane from pgsink.parked_messages p where p.sink_id = s.id and p.id = p_id)
    for no key update;
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
