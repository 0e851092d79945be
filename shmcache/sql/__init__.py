"""The database backend: the same contract on a SQL table, SQLite (one host) or PostgreSQL
(every host), and PostgreSQL's LISTEN/NOTIFY as the channel of the two-tier cache.

- ``store``: the table's shape, per-process connections, fork safety (the storage layer).
- ``sqlite``, ``postgres``: the SQL of each dialect (knows nothing of tokens or sessions).
- ``urls``: database URLs, and the ``open_cache`` schemes ``sqlite://``, ``postgresql://``,
  ``postgres://`` and ``shm+postgresql://``.
- ``cache``: ``DatabaseSessionCache`` (keyed-hash keys, MAC'd values, fail-open reads).
- ``admin``: the ``shmcache`` command's stats, reset, revoke-user, purge and check on a URL.

Nothing here imports the shared-memory backend except ``urls`` (for the tiered scheme).
The public names are re-exported by ``shmcache``; import them from there.
"""
