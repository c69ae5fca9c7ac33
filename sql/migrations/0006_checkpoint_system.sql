-- pgsink state schema, version 6: a checkpoint knows which cluster it is for.
--
-- A checkpoint is an LSN, and LSNs only mean something within one cluster.
-- When a source's host, port or database is pointed at another cluster (a
-- migration, a restored copy), the old checkpoint made the reader skip every
-- transaction of the new cluster below it, on the server (START_REPLICATION's
-- start point) and in the reader: changes lost without a word. The reader now
-- records the server's system identifier (IDENTIFY_SYSTEM) with the
-- checkpoint and starts afresh from the slot when it differs.

alter table pgsink.source_checkpoints add column system_identifier text;
