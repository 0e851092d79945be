"""The shared-memory backend: one host, every worker reading one table directly.

Layers, bottom up (each module's docstring says what it may import):

- ``proc``: is a pid alive, and is it the process we think it is. Knows nothing of segments.
- ``segment``: the named POSIX shared-memory object: create, attach, check owner and mode,
  unlink. Knows nothing of sessions.
- ``layout``: the binary format (header words, slot arrays), drawn in its docstring.
- ``table``: the hash table over any writable buffer (a ``bytearray`` in tests): no OS call,
  no clock, no lock inside it; "_locked" methods say the caller holds the lock.
- ``lock``: the segment lock and its recovery after a holder's death.
- ``counters``: per-process hit/miss records kept in the segment.
- ``cache``: ``SharedMemorySessionCache``, the ``SessionCache`` protocol on top of them all.
- ``admin``: the administrator's side of the cache (stats, check, purge, lock recovery).
- ``fast`` and ``_fast.c``: the optional compiled core of the cache's hot paths and of the
  lock, over the same layout and lock protocol; ``fast`` says which one an object uses.

The public names are re-exported by ``shmcache``; import them from there.
"""
