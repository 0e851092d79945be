"""The Lua scripts behind ``RedisSessionCache``'s per-user index (issue 6).

Redis runs a script as one command: nothing else runs between its first and its last
call. That is what makes ``invalidate_by_user`` safe against a concurrent ``set`` (see
``RedisSessionCache.invalidate_by_user`` for the whole argument). The scripts read the
value's header, which ``_redis.py`` packs as::

    byte 1      version (2)
    bytes 2-9   deadline (int64 LE, ms on the writer's clock; 0: none)
    bytes 10-25 owner: keyed BLAKE2b-128 of the user id, or 16 zero bytes (no user)

(1-based, as Lua counts; ``GETRANGE key 0 24`` reads exactly that.) Anything else under a
session key (another version, another type, a short value) has no owner for them.

Keys the scripts touch but are not given in ``KEYS`` (the old owner's index, the sessions
of an index) are built from the prefix: fine on one Redis, which is all this backend
supports (not Redis Cluster). The ``set`` script reads ``TIME`` after a write, which needs
script effects replication: the default since Redis 5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

VERSION = 2
NO_OWNER = bytes(16)
# A member is pruned from its index this long after its score (its session's expiry):
# Redis expires keys on a clock cached per command, a little behind TIME, so a member is
# never pruned while its session could still be read.
GRACE_MS = 1000


@dataclass(frozen=True)
class Script:
    text: str
    sha: str


def _script(body: str) -> Script:
    text = _PRELUDE + body
    return Script(text, hashlib.sha1(text.encode()).hexdigest())


_PRELUDE = """
local NO_OWNER = string.rep('\\0', 16)
local function owner_of(key)
  local head = redis.pcall('GETRANGE', key, 0, 24)
  if type(head) ~= 'string' or #head ~= 25 or string.byte(head, 1) ~= 2 then
    return nil, nil
  end
  local owner = string.sub(head, 10, 25)
  if owner == NO_OWNER then return nil, nil end
  return owner, string.sub(head, 2, 9)
end
local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
"""

# KEYS[1] the session; KEYS[2] its user's index (absent: no user)
# ARGV[1] value; ARGV[2] PX (ms); ARGV[3] owner (16 bytes, zeros: none); ARGV[4] the
# session's key hash (the index member); ARGV[5] "{prefix}u:"; ARGV[6] the index's PX
SET = _script("""
local previous = owner_of(KEYS[1])
if previous and previous ~= ARGV[3] then
  -- the token moves to another user (or to none): the old user's index lets go of it
  redis.call('ZREM', ARGV[5] .. hex(previous), ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if KEYS[2] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- expired members go as the index is written to: it never grows past the live sessions
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - GRACE)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  end
end
return 1
""".replace("GRACE", str(GRACE_MS)))

# KEYS[1] the session; ARGV[1] its key hash; ARGV[2] "{prefix}u:"
REMOVE = _script("""
local owner = owner_of(KEYS[1])
if owner then redis.call('ZREM', ARGV[2] .. hex(owner), ARGV[1]) end
return redis.call('UNLINK', KEYS[1])
""")

# KEYS[1] the user's index; ARGV[1] owner (16 bytes); ARGV[2] "{prefix}s:"
# Returns the deadline bytes of each session it deleted (the caller counts the live ones).
REVOKE = _script("""
local deadlines, doomed = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[2] .. member
  local owner, deadline = owner_of(key)
  -- a member whose token was re-set to someone else since is not ours to delete
  if owner == ARGV[1] then
    doomed[#doomed + 1] = key
    deadlines[#deadlines + 1] = deadline
  end
end
for i = 1, #doomed, 256 do  -- one UNLINK per 256 keys (unpack() has a stack limit)
  redis.call('UNLINK', unpack(doomed, i, math.min(i + 255, #doomed)))
end
redis.call('UNLINK', KEYS[1])
return deadlines
""")

ALL = (SET, REMOVE, REVOKE)
