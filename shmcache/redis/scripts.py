"""The Lua scripts behind ``RedisSessionCache``: every call is one script on one node.

Redis runs a script as one command: nothing else runs between its first and its last call.
That is what makes ``invalidate_by_user`` safe against a concurrent ``set`` (see
``RedisSessionCache.invalidate_by_user``), and what lets every call check, in the same
command, that the secret it hashed with is still the one in use.

Calling convention (``keys.py`` draws the key names; all share one hash slot):

    KEYS[1]  the fingerprint key           ARGV[1]  this client's fingerprint
    KEYS[2..] the call's own keys          ARGV[2]  "1": a fixed secret= (may write the
                                                    fingerprint if it is missing), else "0"
                                           ARGV[3..] the call's own arguments

A script returns ``{0, what is stored}`` (false: nothing; "?": not a string) when the
fingerprint is not this client's, having done nothing else; otherwise ``{1, ...}``.
Conditions of a write go between ``guard()`` and the write: a check-and-set (a lease, say)
is one more test returning its own status there.

The scripts read the value's header, which ``values.py`` packs as::

    byte 1      version (2)
    bytes 2-9   deadline (int64 LE, ms on the writer's clock; 0: none)
    bytes 10-25 owner: keyed BLAKE2b-128 of the user id, or 16 zero bytes (no user)

(1-based, as Lua counts; ``GETRANGE key 0 24`` reads exactly that.) Anything else under a
session key (another version, another type, a short value) has no owner for them. Keys a
script builds from a prefix argument (the old owner's index, the sessions of an index)
carry the same hash tag, so they are in the script's slot; while that slot migrates, such
a key may already be on the other node, and the script then fails with TRYAGAIN before it
writes anything (``owner_of``) rather than miss it. The ``set`` script reads
``TIME`` after a write, which needs script effects replication: the default since Redis 5.
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
OK, REFUSED = 1, 0  # first element of every reply (LOAD also answers CREATED)
CREATED = 2
FOREIGN = b"?"  # the fingerprint (or secret) key holds something that is not a string


@dataclass(frozen=True)
class Script:
    name: str
    text: str
    sha: str


def _script(name: str, body: str) -> Script:
    text = _PRELUDE + body
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


_PRELUDE = """
local NO_OWNER = string.rep('\\0', 16)
local function guard()
  local stored = redis.pcall('GET', KEYS[1])
  if stored == ARGV[1] then return nil end
  if type(stored) ~= 'string' and type(stored) ~= 'boolean' then return '?' end
  if stored == false and ARGV[2] == '1' then
    redis.call('SET', KEYS[1], ARGV[1])  -- first use (again, after a FLUSHDB)
    return nil
  end
  return stored
end
local function owner_of(key)
  local head = redis.pcall('GETRANGE', key, 0, 24)
  if type(head) == 'table' and head.err and not string.find(head.err, '^WRONGTYPE') then
    -- A key this node cannot serve (its slot is migrating and the key moved, or is gone):
    -- skipping it would let a session escape a revocation, so the call fails, nothing
    -- written yet, and the client tries again once the migration is through.
    error({err = 'TRYAGAIN ' .. head.err})
  end
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

# Only the guard: a client checks its secret at construction with it.
CHECK = _script("check", """
local refused = guard()
if refused ~= nil then return {0, refused} end
return {1}
""")

# KEYS[2] the session. Returns {1} (a miss) or {1, value, PTTL}.
GET = _script("get", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local value = redis.pcall('GET', KEYS[2])
if type(value) ~= 'string' then return {1} end  -- absent, or another type: a miss
return {1, value, redis.call('PTTL', KEYS[2])}
""")

# KEYS[2] the session; KEYS[3] its user's index (absent: no user)
# ARGV[3] value; ARGV[4] PX (ms); ARGV[5] owner (16 bytes, zeros: none); ARGV[6] the
# session's key hash (the index member); ARGV[7] the users' key prefix; ARGV[8] index PX
SET = _script("set", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local previous = owner_of(KEYS[2])
if previous and previous ~= ARGV[5] then
  -- the token moves to another user (or to none): the old user's index lets go of it
  redis.call('ZREM', ARGV[7] .. hex(previous), ARGV[6])
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if KEYS[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- expired members go as the index is written to: it never grows past the live sessions
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - GRACE)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[6])
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[8]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
end
return {1}
""".replace("GRACE", str(GRACE_MS)))

# KEYS[2] the session; ARGV[3] its key hash; ARGV[4] the users' key prefix; ARGV[5] the
# channel. Deletes it, lets go of its index entry, publishes b"i:<hash>".
REMOVE = _script("invalidate", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local owner = owner_of(KEYS[2])
if owner then redis.call('ZREM', ARGV[4] .. hex(owner), ARGV[3]) end
redis.call('UNLINK', KEYS[2])
redis.call('PUBLISH', ARGV[5], 'i:' .. ARGV[3])
return {1}
""")

# KEYS[2] the user's index; ARGV[3] owner (16 bytes); ARGV[4] the sessions' key prefix;
# ARGV[5] the channel. Returns {1, the deadline bytes of each session it deleted} (the
# caller counts the live ones) and publishes b"u:<owner hex>".
REVOKE = _script("invalidate_by_user", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local deadlines, doomed = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = ARGV[4] .. member
  local owner, deadline = owner_of(key)
  -- a member whose token was re-set to someone else since is not ours to delete
  if owner == ARGV[3] then
    doomed[#doomed + 1] = key
    deadlines[#deadlines + 1] = deadline
  end
end
for i = 1, #doomed, 256 do  -- one UNLINK per 256 keys (unpack() has a stack limit)
  redis.call('UNLINK', unpack(doomed, i, math.min(i + 255, #doomed)))
end
redis.call('UNLINK', KEYS[2])
redis.call('PUBLISH', ARGV[5], 'u:' .. hex(ARGV[3]))
return {1, deadlines}
""")

# The end of a clear (the sessions are already unlinked): ARGV[3] the channel.
CLEARED = _script("clear", """
local refused = guard()
if refused ~= nil then return {0, refused} end
redis.call('PUBLISH', ARGV[3], 'c')
return {1}
""")

# Shared-secret mode: read the secret, or create it with its fingerprint.
# KEYS[2] the secret; ARGV[1] the fingerprint of a fresh secret (ARGV[2] unused);
# ARGV[3] the fresh secret; ARGV[4] the channel.
# Returns {1, secret, fingerprint}; {2, ...} if it made them (and announced it);
# {0, fingerprint} if the fingerprint is not a shared secret's (a secret= owns the prefix);
# {0, '?'} if either key holds something else.
LOAD = _script("load secret", """
local fp = redis.pcall('GET', KEYS[1])
local secret = redis.pcall('GET', KEYS[2])
if type(fp) == 'table' or type(secret) == 'table' then return {0, '?'} end
if fp and string.sub(fp, 1, 7) ~= 'shared:' then return {0, fp} end
if fp and secret then return {1, secret, fp} end
-- nothing yet, or half a pair (one of the two evicted or deleted): start over. A new
-- secret orphans every key made under the old one: hosts drop what they copied locally.
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[4], 'c')
return {2, ARGV[3], ARGV[1]}
""")

ALL = (CHECK, GET, SET, REMOVE, REVOKE, CLEARED, LOAD)
