-- pgsink state schema, version 4: new sinks get 16 lanes instead of 64.
--
-- A lane delivers one batch at a time and a batch only holds messages of its
-- lane, so a lane's batch fills at 1/lane_count of the sink's rate: with 64
-- lanes a sink needs 6,400 messages per batch_timeout_ms to send full batches
-- of 100. Measured end to end (benchmarks/RESULTS.md, 200k changes, batch
-- size 100): 64 lanes 9,493/s with 10.5 s of delivery CPU, 16 lanes
-- 10,925/s with 8.0 s, 8 lanes 11,495/s with 7.4 s. 16 keeps up to 16
-- requests in flight per sink and confines a failing group (until it is
-- parked) to a sixteenth of the sink's groups. Existing sinks keep their lanes.

alter table pgsink.sinks alter column lane_count set default 16;
