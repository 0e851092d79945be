"""The Redis backend: the same contract across hosts, one Redis (or Valkey) as the store.

- ``scripts``: the Lua scripts and the key layout they rely on.
- ``client``: building a redis-py client from a URL, and the URL parameters it accepts.
- ``cache``: ``RedisSessionCache`` (keyed-hash keys, MAC'd values, fail-open reads).

Nothing here imports the shared-memory backend; ``shmcache.tiered`` puts the two together.
The public names are re-exported by ``shmcache``; import them from there.
"""
