"""Redis: client, names, transport, partitions and owners, the ingest mover."""
