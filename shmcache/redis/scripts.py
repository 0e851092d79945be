"""The Lua scripts behind ``RedisSessionCache``: every call is one script on one node.

Redis runs a script as one command: nothing else runs between its first and its last call.
That is what makes ``invalidate_by_user`` safe against a concurrent ``set`` (see
``RedisSessionCache.invalidate_by_user``), what lets every call check, in the same
command, that the secret it hashed with is still the one in use, and what lets a ``set``
check its lease (below) atomically with its write.

Calling convention (``keys.py`` draws the key names; all share one hash slot):

    KEYS[1]  the fingerprint key           ARGV[1]  this client's fingerprint
    KEYS[2..] the call's own keys          ARGV[2]  "1": a fixed secret= (may write the
                                                    fingerprint if it is missing), else "0"
                                           ARGV[3]  this client's lease_timeout (ms)
                                           ARGV[4..] the call's own arguments

The lease keys (the logout clock, the horizon, the logout marks) are named by the scripts
from KEYS[1]'s hash tag, not declared: they may not exist, and while the slot migrates a
command that declares a missing key fails (TRYAGAIN) even where nothing needs it, such as a
hit. Where this node cannot serve one of them (mid-migration), the script fails with
TRYAGAIN before its own writes.

A script returns ``{0, what is stored}`` (false: nothing; "?": not a string) when the
fingerprint is not this client's, having done nothing else; otherwise ``{1, ...}``.

Leases (``shmcache/_leases.py`` says what they promise): every logout (``invalidate``,
``invalidate_by_user``, the end of ``clear``) takes the next value of the *logout clock*
and writes it as the *logout mark* of what it logged out (the token's key hash, the user's
hash, or the cache), in the same script as the delete. A ``get`` that misses returns the
clock's value (the lease's stamp) and the server's time in the same script, so a miss costs
no extra round trip and a hit nothing at all. The ``set`` after that miss hands both back,
and its script refuses the write when the token's, the user's or the clear's mark is above
the stamp (a logout since the miss), or when the lease is older than ``lease_timeout`` on
the server's clock; a refused set also deletes the token's entry, so no older copy is
served. What a missing key means, and why it never lets a racing set through:

* a missing mark: no logout since the lease was granted. Marks live ``max(lease_timeout,
  horizon) + GRACE_MS`` (on the server's clock, the clock the lease's age is checked on), and
  the horizon is at least the lease_timeout of every client that missed within its own
  lease_timeout (each miss raises it, and it expires only after that), so a mark outlives
  every lease it could void;
* a missing clock (``FLUSHDB``, an eviction): the clock is strictly increasing and never
  behind the server's time in microseconds, so it restarts above every stamp handed out;
* a missing fingerprint or shared secret (``FLUSHDB``, an empty failover): whoever writes it
  again also marks a clear, so every lease from before is void (a false drop at worst).

The scripts read the value's header, which ``values.py`` packs as::

    byte 1      version (2)
    bytes 2-9   deadline (int64 LE, ms on the writer's clock; 0: none)
    bytes 10-25 owner: keyed BLAKE2b-128 of the user id, or 16 zero bytes (no user)

(1-based, as Lua counts; ``GETRANGE key 0 24`` reads exactly that.) Anything else under a
session key (another version, another type, a short value) has no owner for them. Keys a
script builds from a prefix argument (the old owner's index, the sessions of an index)
carry the same hash tag, so they are in the script's slot; while that slot migrates, such
a key may already be on the other node, and the script then fails with TRYAGAIN before it
writes anything (``owner_of``) rather than miss it. Scripts read ``TIME`` before and
after writes, which needs script effects replication: the default since Redis 5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import keys

VERSION = 2
NO_OWNER = bytes(16)
# A member is pruned from its index this long after its score (its session's expiry):
# Redis expires keys on a clock cached per command, a little behind TIME, so a member is
# never pruned while its session could still be read. Logout marks outlive the longest
# lease by as much, for the same reason.
GRACE_MS = 1000
OK, REFUSED = 1, 0  # first element of every reply (LOAD also answers CREATED)
CREATED = 2
FOREIGN = b"?"  # the fingerprint (or secret) key holds something that is not a string
NO_LEASE, VOID_LEASE = "", "x"  # ARGV of SET: no miss before this set; a lease known void
STORED, DROPPED = 1, 0  # second element of SET's reply


@dataclass(frozen=True)
class Script:
    name: str
    text: str
    sha: str


def _script(name: str, body: str) -> Script:
    text = _PRELUDE + body
    for word, value in _NAMES.items():
        text = text.replace(word, value)
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


_NAMES = {  # spelled in the Lua below in capitals, replaced by _script
    "GRACE": str(GRACE_MS),
    "TAG_END": str(-len(keys.FINGERPRINT) - 1),
    "'CLOCK_KEY'": repr(keys.CLOCK),
    "'HORIZON_KEY'": repr(keys.HORIZON),
    "'CLEARED_KEY'": repr(keys.CLEARED),
    "'SESSION_MARKS'": repr(keys.SESSION_MARKS),
    "'USER_MARKS'": repr(keys.USER_MARKS),
    "'NO_LEASE'": repr(NO_LEASE),
    "'VOID_LEASE'": repr(VOID_LEASE),
    "DROPPED": str(DROPPED),
    "STORED": str(STORED),
}

_PRELUDE = """
local NO_OWNER = string.rep('\\0', 16)
local TAG = string.sub(KEYS[1], 1, TAG_END)  -- the cache's hash tag, '{prefix}'
local CLOCK, HORIZON, CLEARED = TAG .. 'CLOCK_KEY', TAG .. 'HORIZON_KEY', TAG .. 'CLEARED_KEY'
-- A command on a lease key (not declared: see the docstring). Mid-migration this node may
-- not serve it: the client tries again (TRYAGAIN), before the script's own writes.
local function on(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, '^WRONGTYPE') or string.find(reply.err, '^OOM') then
      error(reply)
    end
    error({err = 'TRYAGAIN ' .. reply.err})
  end
  return reply
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function int(n) return string.format('%.0f', n) end  -- exact below 2^53
-- A logout: the next value of the logout clock (strictly increasing, and never behind the
-- server's time, so a clock lost to FLUSHDB or an eviction restarts above every stamp),
-- written under `key` for as long as any lease it must void can live. Called before the
-- script's other writes: a mark alone (the script failing after it) only voids leases.
local function mark(key)
  local clock = tonumber(on('GET', CLOCK)) or 0
  local keep = math.max(tonumber(ARGV[3]), tonumber(on('GET', HORIZON)) or 0) + GRACE
  on('EXISTS', key)  -- can this node write it? (else TRYAGAIN, nothing written)
  local n = int(math.max(clock + 1, now_us()))
  on('SET', CLOCK, n)
  on('SET', key, n, 'PX', keep)
end
-- A miss: a lease, {stamp, server time in us}. The horizon is raised to this client's
-- lease_timeout for as long as its lease can live (rewritten at most about once per GRACE
-- ms while every client has the same lease_timeout).
local function lease()
  local now = now_us()
  local stamp = on('GET', CLOCK)
  local own = tonumber(ARGV[3])
  local horizon = tonumber(on('GET', HORIZON)) or 0
  if not stamp then
    stamp = int(now)
    on('SET', CLOCK, stamp)
  end
  if horizon < own or (horizon == own and on('PTTL', HORIZON) < own) then
    on('SET', HORIZON, ARGV[3], 'PX', own + GRACE)
  end
  return {stamp, int(now)}
end
local function above(key, stamp)  -- a logout mark above a lease's stamp: a logout since
  return (tonumber(on('GET', key)) or 0) > stamp
end
local function guard()
  local stored = redis.pcall('GET', KEYS[1])
  if stored == ARGV[1] then return nil end
  if type(stored) ~= 'string' and type(stored) ~= 'boolean' then return '?' end
  if stored == false and ARGV[2] == '1' then
    -- First use (again, after a FLUSHDB or a failover to an empty replica): logout marks
    -- may have been lost with it, so every lease handed out before is void.
    mark(CLEARED)
    redis.call('SET', KEYS[1], ARGV[1])
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

# The guard, then the fingerprint written again (unchanged): a client checks its secret at
# construction with it, and a replica refuses the write (READONLY), so a cache made on a
# replica fails there rather than at its first logout.
CHECK = _script("check", """
local refused = guard()
if refused ~= nil then return {0, refused} end
redis.call('SET', KEYS[1], ARGV[1])
return {1}
""")

# KEYS[2] the session. Returns {1, value, PTTL}, or for a miss {1, 0, stamp, time}: the
# lease, in the same call.
GET = _script("get", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local value = redis.pcall('GET', KEYS[2])
if type(value) == 'string' then return {1, value, redis.call('PTTL', KEYS[2])} end
local granted = lease()  -- absent, or another type: a miss
return {1, 0, granted[1], granted[2]}
""")

# A lease alone, {1, 0, stamp, time}: for a hit that turned out a miss (a value that is not
# ours, or past its deadline on the client's clock).
LEASE = _script("lease", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local granted = lease()
return {1, 0, granted[1], granted[2]}
""")

# KEYS[2] the session; KEYS[3] its user's index (absent: no user)
# ARGV[4] value; ARGV[5] PX (ms); ARGV[6] owner (16 bytes, zeros: none); ARGV[7] the
# session's key hash (the index member); ARGV[8] the users' key prefix; ARGV[9] index PX;
# ARGV[10] the lease's stamp (NO_LEASE: no miss before; VOID_LEASE: void); ARGV[11] the
# lease's server time (us); ARGV[12] the channel.
# Returns {1, STORED} or {1, DROPPED}.
SET = _script("set", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local lease = ARGV[10]
if lease ~= 'NO_LEASE' then
  local void = lease == 'VOID_LEASE'
  if not void then
    local stamp = tonumber(lease)
    void = now_us() - tonumber(ARGV[11]) >= tonumber(ARGV[3]) * 1000
      or above(TAG .. 'SESSION_MARKS' .. ARGV[7], stamp) or above(CLEARED, stamp)
      or (KEYS[3] ~= nil and above(TAG .. 'USER_MARKS' .. hex(ARGV[6]), stamp))
  end
  if void then
    -- A logout since the miss (or a lease too old to tell): not stored, and no older copy
    -- stays either: the token is a miss everywhere.
    local owner = owner_of(KEYS[2])
    if owner then redis.call('ZREM', ARGV[8] .. hex(owner), ARGV[7]) end
    if redis.call('UNLINK', KEYS[2]) == 1 then
      redis.call('PUBLISH', ARGV[12], 'i:' .. ARGV[7])
    end
    return {1, DROPPED}
  end
end
local previous = owner_of(KEYS[2])
if previous and previous ~= ARGV[6] then
  -- the token moves to another user (or to none): the old user's index lets go of it
  redis.call('ZREM', ARGV[8] .. hex(previous), ARGV[7])
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
if KEYS[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- expired members go as the index is written to: it never grows past the live sessions
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - GRACE)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[7])
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[9]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[9])
  end
end
return {1, STORED}
""")

# KEYS[2] the session; ARGV[4] its key hash; ARGV[5] the users' key prefix; ARGV[6] the
# channel. Marks the logout (voiding the leases of racing validations), deletes the
# session, lets go of its index entry, publishes b"i:<hash>".
REMOVE = _script("invalidate", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local owner = owner_of(KEYS[2])
mark(TAG .. 'SESSION_MARKS' .. ARGV[4])
if owner then redis.call('ZREM', ARGV[5] .. hex(owner), ARGV[4]) end
redis.call('UNLINK', KEYS[2])
redis.call('PUBLISH', ARGV[6], 'i:' .. ARGV[4])
return {1}
""")

# KEYS[2] the user's index; ARGV[4] owner (16 bytes); ARGV[5] the sessions' key prefix;
# ARGV[6] the channel. Marks the logout, returns {1, the deadline bytes of each session it
# deleted} (the caller counts the live ones) and publishes b"u:<owner hex>".
REVOKE = _script("invalidate_by_user", """
local refused = guard()
if refused ~= nil then return {0, refused} end
local deadlines, doomed = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = ARGV[5] .. member
  local owner, deadline = owner_of(key)
  -- a member whose token was re-set to someone else since is not ours to delete
  if owner == ARGV[4] then
    doomed[#doomed + 1] = key
    deadlines[#deadlines + 1] = deadline
  end
end
mark(TAG .. 'USER_MARKS' .. hex(ARGV[4]))
for i = 1, #doomed, 256 do  -- one UNLINK per 256 keys (unpack() has a stack limit)
  redis.call('UNLINK', unpack(doomed, i, math.min(i + 255, #doomed)))
end
redis.call('UNLINK', KEYS[2])
redis.call('PUBLISH', ARGV[6], 'u:' .. hex(ARGV[4]))
return {1, deadlines}
""")

# The end of a clear (the sessions are already unlinked): marks the clear (every lease
# handed out before it is void); ARGV[4] the channel.
CLEARED = _script("clear", """
local refused = guard()
if refused ~= nil then return {0, refused} end
mark(CLEARED)
redis.call('PUBLISH', ARGV[4], 'c')
return {1}
""")

# Shared-secret mode: read the secret, or create it with its fingerprint.
# KEYS[2] the secret; ARGV[1] the fingerprint of a fresh secret (ARGV[2] unused);
# ARGV[4] the fresh secret; ARGV[5] the channel.
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
-- secret orphans every key made under the old one: hosts drop what they copied locally,
-- and every lease handed out before is void (its logout marks are under old key hashes).
mark(CLEARED)
redis.call('SET', KEYS[2], ARGV[4])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[5], 'c')
return {2, ARGV[4], ARGV[1]}
""")

ALL = (CHECK, GET, LEASE, SET, REMOVE, REVOKE, CLEARED, LOAD)
