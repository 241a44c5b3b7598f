"""Persistence: request records and their companions (SQLite / PostgreSQL, alembic-migrated), read
back as typed records (records.py), and the local image blob store (blobs.py). All SQL lives in this
package: `db.Database` (jobs, upstream tasks, files, webhook deliveries), `keys.KeyRows`,
`idempotency.IdempotencyKeys`, `history.HistoryRows` and `ledger` (reserve and settle)."""
