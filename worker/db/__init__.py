"""The database: engine, executor, group and one-statement paths, ledger, fencing, schema."""
