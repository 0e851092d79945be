"""The Redis backend: the same contract across hosts, on Redis or Valkey (one server, a
primary behind Sentinel, or a cluster), through redis-py or valkey-py.

From the bottom up:

- ``client``: a client from a URL (``redis://``, ``redis+cluster://``, ``redis+sentinel://``,
  ``valkey://``...), or checks on one the caller made. No sessions.
- ``link``: every call is one Lua script on the node of the cache's hash slot, with WAIT
  behind it when asked; cluster redirections; replies recognised by their text. No sessions.
- ``keys``, ``values``, ``secret``: the key layout (one hash slot per cache), the bytes of a
  value and its MAC, the keyed hashes. Pure.
- ``scripts``, ``keyring``: the Lua scripts; which secret a cache hashes with, and the
  fingerprint that keeps every host on the same one.
- ``store``, ``cache``: the Redis operations; ``RedisSessionCache`` on top.

Nothing here imports the shared-memory backend; ``shmcache.tiered`` puts the two together.
The public names are re-exported by ``shmcache``; import them from there.
"""
