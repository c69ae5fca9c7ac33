"""pgsink engine: capture Postgres changes and deliver them to webhooks, all state in Postgres."""
