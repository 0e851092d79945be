"""Leases on PostgreSQL: the two server-side functions that make a leased ``set`` and a
logout exclude each other.

Layer: the storage layer of the database backend (``postgres.py`` creates these functions
with its tables and calls them); knows nothing of tokens or sessions. The stamps
themselves are described in ``store.py``.

Why functions, and not one more ``NOT EXISTS`` in the set's statement: under READ COMMITTED
a statement reads from the snapshot taken when it started. A set whose statement started
just before a logout committed does not see the logout's stamp, and a logout whose
statement started just before that set committed does not see the new row: both commit,
and the logged-out token is a hit again. A logout that waits with its snapshot taken
(for the ``head`` row, behind another logout, say) makes that window as long as the wait
(``tests/sql/test_sql_leases.py`` provokes it). Within a VOLATILE function every statement
takes a fresh snapshot, so each side takes its lock first and reads afterwards:

- ``{t}_void_v1`` (invalidate, invalidate_by_user, clear) takes an exclusive advisory lock
  on its token, its user, or "everything" (clear), waiting for it; then deletes, stamps and
  notifies. A leased set holding the shared lock has committed when the delete looks.
- ``{t}_set_v1`` (a set after a miss) tries the shared locks on its token, its user and
  "everything" without waiting. One that is held is a logout running now, which commits a
  stamp above the lease: the set would be refused anyway, and is refused at once. Having
  them, it reads the floor and the stamps: every logout that could refuse it has committed.

Advisory locks are counted in the lock manager, not written to any row. Lock ids: the
table's class id (CRC-32 of ``shmcache:{t}``, so tables do not share locks) and the first
4 bytes of the key or owner hash (0: everything); two hashes that share them cost at
worst a false drop (a set refused while the other's logout runs) or a logout that waits
for a set to commit. The functions are versioned by name: a later layout makes ``_v2``
beside them instead of replacing what older clients call.
"""

from __future__ import annotations

import zlib

from .store import DROPS, FLOOR, HASH_BYTES, HEAD

VERSION = "v1"
NOW_MS = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
NOW_US = "floor(extract(epoch FROM statement_timestamp()) * 1000000)::bigint"


def literal(data: bytes) -> str:
    """A bytea literal of our own constants (never of user data)."""
    return f"'\\x{data.hex()}'::bytea"


def class_id(table: str) -> int:
    """The advisory lock class of ``table``'s leases: a signed 32-bit integer."""
    crc = zlib.crc32(f"shmcache:{table}".encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def set_function(table: str, meta: str, stamps: str) -> str:
    """``{t}_set_v1(key, owner, value, ttl_ms, fp, now_ms, lease, channel)``: 1 stored,
    0 refused (the token's row deleted, and announced if there was one), -1 the meta row
    does not hold ``fp`` (nothing changed)."""
    c = class_id(table)
    lock = "('x' || encode(substr({}, 1, 4), 'hex'))::bit(32)::integer"
    return f"""
CREATE OR REPLACE FUNCTION {table}_set_{VERSION}(
    p_key bytea, p_owner bytea, p_value bytea, p_ttl bigint, p_fp bytea, p_now bigint,
    p_lease bigint, p_channel text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n bigint := COALESCE(p_now, {NOW_MS});
    ok boolean := pg_try_advisory_xact_lock_shared({c}, 0)
        AND pg_try_advisory_xact_lock_shared({c}, {lock.format("p_key")})
        AND (p_owner IS NULL
             OR pg_try_advisory_xact_lock_shared({c}, {lock.format("p_owner")}));
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {meta} WHERE id = 1 AND fingerprint = p_fp) THEN
        RETURN -1;
    END IF;
    IF ok THEN  -- (a fresh snapshot: every logout that holds none of these committed)
        ok := (SELECT stamp FROM {stamps} WHERE key = {literal(FLOOR)}) <= p_lease
            AND NOT EXISTS (SELECT 1 FROM {stamps} WHERE key IN (p_key, p_owner)
                            AND stamp > p_lease);
    END IF;
    IF ok THEN
        INSERT INTO {table} (key, owner, expires, value) VALUES (p_key, p_owner, n + p_ttl,
            p_value)
        ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires,
            value = excluded.value;
        RETURN 1;
    END IF;
    DELETE FROM {table} WHERE key = p_key;
    IF FOUND THEN
        PERFORM pg_notify(p_channel, 'i:' || encode(p_key, 'hex'));
    END IF;
    UPDATE {stamps} SET stamp = stamp + 1 WHERE key = {literal(DROPS)};
    RETURN 0;
END
$fn$"""


def void_function(table: str, meta: str, stamps: str) -> str:
    """``{t}_void_v1(key, owner, fp, now_ms, channel, message)`` -> ``(fingerprint, live)``:
    with ``key``, invalidate it; with ``owner``, every row of that user; with neither,
    clear. Deletes and stamps only if the meta row holds ``fp`` (it returns the one it
    holds); ``live`` is how many deleted rows were live."""
    c = class_id(table)
    lock = "('x' || encode(substr({}, 1, 4), 'hex'))::bit(32)::integer"
    head, floor_ = literal(HEAD), literal(FLOOR)
    return f"""
CREATE OR REPLACE FUNCTION {table}_void_{VERSION}(
    p_key bytea, p_owner bytea, p_fp bytea, p_now bigint, p_channel text, p_message text,
    OUT fingerprint bytea, OUT live bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n bigint := COALESCE(p_now, {NOW_MS});
    s bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({c}, CASE WHEN p_key IS NOT NULL THEN {lock.format("p_key")}
        WHEN p_owner IS NOT NULL THEN {lock.format("p_owner")} ELSE 0 END);
    SELECT m.fingerprint INTO fingerprint FROM {meta} m WHERE m.id = 1;
    live := 0;
    IF fingerprint IS DISTINCT FROM p_fp THEN
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        WITH d AS (DELETE FROM {table} WHERE key = p_key RETURNING expires)
        SELECT count(*) FILTER (WHERE expires > n) INTO live FROM d;
    ELSIF p_owner IS NOT NULL THEN
        WITH d AS (DELETE FROM {table} WHERE owner = p_owner RETURNING expires)
        SELECT count(*) FILTER (WHERE expires > n) INTO live FROM d;
    ELSE
        WITH d AS (DELETE FROM {table} RETURNING expires)
        SELECT count(*) FILTER (WHERE expires > n) INTO live FROM d;
    END IF;
    -- The stamp last: other logouts wait for the head row only from here to the commit.
    UPDATE {stamps} SET stamp = greatest(stamp + 1, {NOW_US}) WHERE key = {head}
        RETURNING stamp INTO s;
    IF s IS NULL OR NOT EXISTS (SELECT 1 FROM {stamps} WHERE key = {floor_}) THEN
        -- The stamps were lost (a crash empties UNLOGGED tables): start again above
        -- every lease handed out, and void them all.
        INSERT INTO {stamps} (key, stamp) VALUES ({head}, {NOW_US}), ({floor_}, {NOW_US})
        ON CONFLICT (key) DO UPDATE SET stamp = greatest({stamps}.stamp, excluded.stamp);
        SELECT stamp INTO s FROM {stamps} WHERE key = {head};
    END IF;
    IF p_key IS NOT NULL OR p_owner IS NOT NULL THEN
        INSERT INTO {stamps} (key, stamp) VALUES (COALESCE(p_key, p_owner), s)
        ON CONFLICT (key) DO UPDATE SET stamp = greatest({stamps}.stamp, excluded.stamp);
    ELSE
        DELETE FROM {stamps} WHERE length(key) = {HASH_BYTES};
        UPDATE {stamps} SET stamp = greatest(stamp, s) WHERE key = {floor_};
    END IF;
    PERFORM pg_notify(p_channel, p_message);
END
$fn$"""


def restart_stamps(stamps: str) -> str:
    """The statement that makes ``head`` and ``floor`` again if one is missing (both at
    the clock, above every lease handed out) and ``drops`` if it is."""
    head, floor_, drops = literal(HEAD), literal(FLOOR), literal(DROPS)
    return (
        f"WITH d AS (INSERT INTO {stamps} (key, stamp) VALUES ({drops}, 0) "
        "ON CONFLICT (key) DO NOTHING) "
        f"INSERT INTO {stamps} (key, stamp) SELECT k, {NOW_US} "
        f"FROM (VALUES ({head}), ({floor_})) v (k) "
        f"WHERE (SELECT count(*) FROM {stamps} WHERE key IN ({head}, {floor_})) < 2 "
        f"ON CONFLICT (key) DO UPDATE SET stamp = greatest({stamps}.stamp, excluded.stamp)"
    )


def reclaim_stamps(stamps: str) -> str:
    """Delete the stamps older than ``%(age)s`` µs and raise the floor to the newest of
    them, in one statement; selects how many."""
    return (
        f"WITH d AS (DELETE FROM {stamps} WHERE length(key) = {HASH_BYTES} "
        f"AND stamp < {NOW_US} - %(age)s RETURNING stamp), "
        f"f AS (UPDATE {stamps} SET stamp = greatest(stamp, (SELECT max(stamp) FROM d)) "
        f"WHERE key = {literal(FLOOR)} AND EXISTS (SELECT 1 FROM d)) "
        "SELECT count(*) FROM d"
    )
