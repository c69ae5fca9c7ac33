"""SQL shipped with pgsink: numbered migrations and named queries (read as package data)."""
