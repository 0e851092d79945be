"""The capacity promise: a table filled to ``capacity`` live sessions evicts none.

This runs the real table code (on a bytearray) with random tokens and a fresh secret each
time, so every CI run is one more trial of the figure stated in the README.
"""

from __future__ import annotations

import random
import secrets

import pytest

from shmcache.shm.layout import W_EVICTIONS, Geometry
from shmcache.shm.table import Table, make_meta

FAR = 10**9  # ms: nothing expires during these tests


def _table(capacity: int) -> Table:
    geo = Geometry.for_capacity(capacity)
    return Table(bytearray(geo.size), geo, secrets.randbits(64), secrets.randbits(64))


@pytest.mark.parametrize("capacity", [1, 7, 100, 4096, 65536])
def test_filling_to_capacity_evicts_nothing(capacity: int) -> None:
    table = _table(capacity)
    for i in range(capacity):
        tag, home = table.tag_of(secrets.token_bytes(32))
        table.store_locked(tag, home, make_meta(FAR, i), None, 0)
    assert table.words[W_EVICTIONS] == 0
    assert table.census(0)["entries"] == capacity


def test_churn_at_capacity_evicts_nothing() -> None:
    capacity = 16384
    rnd = random.Random(secrets.randbits(32))
    table = _table(capacity)
    live: list[tuple[bytes, int]] = []
    for i in range(capacity):
        tag, home = table.tag_of(secrets.token_bytes(32))
        table.store_locked(tag, home, make_meta(FAR, i), None, 0)
        live.append((tag, home))
    for i in range(2 * capacity):  # two full turns: every session replaced twice
        j = rnd.randrange(len(live))
        tag, home = live[j]
        assert table.remove_locked(tag, home)
        tag, home = table.tag_of(secrets.token_bytes(32))
        table.store_locked(tag, home, make_meta(FAR, i), None, 0)
        live[j] = (tag, home)
    assert table.words[W_EVICTIONS] == 0
    assert table.census(0)["entries"] == capacity
    assert all(table.find(tag, home) >= 0 for tag, home in live)


def test_beyond_capacity_the_table_evicts_instead_of_failing() -> None:
    """The converse, so the two tests above could fail: 3x capacity must evict."""
    capacity = 64
    table = _table(capacity)
    geo = table.geometry
    for i in range(3 * geo.physical_slots):
        tag, home = table.tag_of(secrets.token_bytes(32))
        slot, _ = table.store_locked(tag, home, make_meta(FAR + i, i), None, 0)
        assert table.find(tag, home) == slot  # the newest entry is always stored
    assert table.words[W_EVICTIONS] > 0
