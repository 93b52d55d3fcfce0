"""The dashboard, ``update-worker web``: the queue, the partitions, the workers and the dead
letters of one deployment in a browser, and replay or purge of dead letters (README,
Dashboard). It reads Redis and the database; it needs no running worker."""
