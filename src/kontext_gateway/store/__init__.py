"""Persistence: request records and their companions (SQLite / PostgreSQL, alembic-migrated), read
back as typed records (records.py), and the image blob stores (blobs.py: the interface and the local
directory; s3blobs.py: S3-compatible object storage; blob_url.py: which one). All SQL lives in this
package: `db.Database` (jobs, upstream tasks, files, webhook deliveries), `keys.KeyRows`,
`idempotency.IdempotencyKeys`, `history.HistoryRows`, `ledger` (reserve and settle) and
`provider_health.PostgresHealthStore` (breakers and latencies shared by the gateway's processes)."""
