-- pgsink state schema, version 3: endpoint security and sink functions.
--
-- Endpoints: opt-in Standard Webhooks signing (secrets encrypted at rest,
-- several during a rotation), a block on private addresses, a CA bundle and a
-- rate limit shared by every worker (a token bucket row per endpoint).
-- Sinks: filters applied at enqueue time (column filters, a SQL expression, a
-- Python function), transforms and routing applied at delivery.
-- Independent of migration 0002.

alter table pgsink.http_endpoints
    -- AES-GCM of a JSON list [{"secret": "whsec_...", "expires_at": <unix seconds> | null}],
    -- the current secret first; null: requests are not signed.
    add column signing_secrets_encrypted bytea,
    add column block_private_addresses boolean not null default false,
    add column ca_bundle text,  -- path of a PEM file of CAs to trust instead of the system's
    add column rate_limit double precision check (rate_limit > 0);  -- requests/s, all workers together

-- One token bucket per rate-limited endpoint; every request takes a token.
create table pgsink.endpoint_rate_limits (
    endpoint_id  uuid primary key references pgsink.http_endpoints (id) on delete cascade,
    tokens       double precision not null,
    updated_at   timestamptz not null default clock_timestamp()
);

-- Take one token of an endpoint's bucket (capacity: one second of its rate).
-- Returns how many seconds the caller must wait before sending: 0 when a
-- token was there. The token is taken either way, so callers queue fairly.
create function pgsink.take_rate_token(p_endpoint_id uuid, p_rate double precision)
returns double precision
language plpgsql
as $$
declare
    left_after double precision;
begin
    insert into pgsink.endpoint_rate_limits as b (endpoint_id, tokens, updated_at)
    values (p_endpoint_id, greatest(p_rate, 1) - 1, clock_timestamp())
    on conflict (endpoint_id) do update
        set tokens = least(greatest(p_rate, 1),
                           b.tokens + p_rate * extract(epoch from clock_timestamp() - b.updated_at)) - 1,
            updated_at = clock_timestamp()
    returning tokens into left_after;
    return greatest(0, -left_after / p_rate);
end
$$;

alter table pgsink.sinks
    -- sequin.yaml column filters: [{"column_name", "operator", "comparison_value", "field_path", "field_type"}]
    add column filters jsonb not null default '[]'::jsonb,
    add column filter_sql text,           -- a SQL boolean expression over the row
    add column filter_function text,      -- "path/to/file.py" or "module:function"
    add column transform_path text,       -- "record", "record.id", ...
    add column transform_function text,
    add column route_function text,
    add column enrichment_sql text,       -- a SELECT run against the source per batch, $1: the primary keys
    add column function_timeout_ms integer not null default 1000 check (function_timeout_ms > 0);
