"""Many servers cost no more per task than two (issue 15, item 6).

A map sizes its chunks from the time the *workers* spent on them, not from their round trip
(which counts the wait behind the other chunks in flight, a wait that grows with the number
of servers), and work is spread over every server, not piled on the first ones. Checked on
real local servers through their public ``stats()`` task counts; the chunk sizer itself is
checked on its own (``rpycsvc.client.mapping.ChunkSizer``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from rpycsvc import Cluster
from rpycsvc.client.mapping import (
    GROWTH,
    MAX_CHUNK,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_SECONDS,
    TARGET_CHUNK_SECONDS,
    ChunkSizer,
)

SERVERS = 8


@pytest.fixture(scope="module")
def eight() -> Iterator[Cluster]:
    """Eight local servers of one worker each."""
    with Cluster.local(SERVERS, workers=1, output="discard") as c:
        yield c


def _tasks_done(c: Cluster) -> dict[str, int]:
    out: dict[str, int] = {}
    for address, stats in c.stats().items():
        assert isinstance(stats, dict), (address, stats)
        out[address] = int(stats["tasks_done"]) + int(stats["tasks_failed"])
    return out


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {a: after[a] - before[a] for a in after}


def _pause(seconds: float) -> int:
    time.sleep(seconds)
    return os.getppid()


def test_map_over_eight_servers_spreads_tasks_and_keeps_order(eight: Cluster) -> None:
    before = _tasks_done(eight)
    out = list(eight.map(_pause, [0.002] * 400))
    ran = _delta(before, _tasks_done(eight))
    pids = {c.address: c.stats()["pid"] for c in eight.clients}
    assert len(out) == 400 and set(out) <= set(pids.values())
    assert all(n > 0 for n in ran.values()), f"some server ran nothing: {ran}"
    assert set(out) == set(pids.values()), "every server's worker ran some items"
    # results right and in input order
    assert list(eight.map(divmod, range(3000), [7] * 3000)) == [divmod(x, 7) for x in range(3000)]
    unordered = eight.map(abs, range(-2000, 0), ordered=False)
    assert sorted(unordered) == list(range(1, 2001))


def test_cheap_items_over_many_servers_go_in_few_big_chunks(eight: Cluster) -> None:
    # 20,000 no-ops: measured by their round trip (which grows with the servers in flight)
    # they looked slow and went in tiny chunks (3,000 to 19,600 tasks on 8 servers, the
    # more the busier the machine); by the workers' time they go in chunks of thousands.
    before = _tasks_done(eight)
    items = range(-20_000, 0)
    assert list(eight.map(abs, items)) == [abs(x) for x in items]
    ran = _delta(before, _tasks_done(eight))
    assert sum(ran.values()) < 400, f"tasks per server: {ran}"


def test_idle_servers_take_turns(eight: Cluster) -> None:
    # One task at a time: every server is idle at each submit; the pick rotates among
    # equally loaded servers instead of always taking the first.
    pids = {eight.submit(os.getppid).result(timeout=60) for _ in range(2 * SERVERS)}
    assert pids == {c.stats()["pid"] for c in eight.clients}


# -- the chunk sizer on its own -----------------------------------------------------------------
def test_sizer_aims_at_the_target_service_time_per_chunk() -> None:
    sizer = ChunkSizer(None, workers=40, total=None)
    assert sizer.next_size(0) == 1  # nothing measured yet: one item
    sizer.observe(1, 50e-6)  # one item took its worker 50 µs: 400 items make the target,
    assert sizer.next_size(1) == GROWTH  # but one item measured says little yet
    sizer.observe(GROWTH, GROWTH * 50e-6)
    assert sizer.next_size(1) == int(TARGET_CHUNK_SECONDS / 50e-6)
    for _ in range(6):  # bigger chunks of cheaper items (0.2 µs): the estimate follows them
        sizer.observe(sizer.next_size(0), sizer.next_size(0) * 2e-7)
    assert sizer.next_size(0) == MAX_CHUNK
    slow = ChunkSizer(None, workers=2, total=None)
    slow.observe(3, 3.0)  # a second per item: one per chunk
    assert slow.next_size(0) == 1


def test_sizer_shrinks_chunks_near_the_end_but_not_below_a_floor() -> None:
    sizer = ChunkSizer(None, workers=4, total=100_000)
    sizer.observe(1000, 1000 * 100e-6)  # 100 µs per item: 200 items make the target
    assert sizer.next_size(0) == 200
    # 800 left: a fair share for 4 workers (2 chunks each) is 100 items
    assert sizer.next_size(100_000 - 800) == 100
    # never below MIN_CHUNK_SECONDS of work, however little is left over many workers
    floor = int(MIN_CHUNK_SECONDS / 100e-6)
    assert sizer.next_size(100_000 - 50) == floor
    cheap = ChunkSizer(None, workers=40, total=20_000)
    cheap.observe(2000, 2000 * 1e-6)
    # 40 workers: a fair share of 20,000 is 250 items, which would be 0.25 ms of work each
    assert cheap.next_size(0) == int(MIN_CHUNK_SECONDS / 1e-6)


def test_sizer_ramps_up_the_chunks_in_flight() -> None:
    sizer = ChunkSizer(None, workers=8, total=None)
    assert sizer.in_flight(32) == 1  # the first chunk goes alone
    sizer.observe(1, 1e-4)
    assert sizer.in_flight(32) == 3
    sizer.observe(1, 1e-4)
    assert sizer.in_flight(32) == 5
    for _ in range(20):
        sizer.observe(1, 1e-4)
    assert sizer.in_flight(32) == 32
    slow = ChunkSizer(None, workers=8, total=None)
    slow.observe(1, 2 * TARGET_CHUNK_SECONDS)  # slow items: no reason to hold chunks back
    assert slow.in_flight(32) == 32
    fixed = ChunkSizer(5, workers=8, total=None)
    assert fixed.in_flight(32) == 32 and fixed.next_size(0) == 5
    fixed.observe(5, 1.0)
    assert fixed.next_size(0) == 5


def test_sizer_keeps_chunks_of_big_items_small_in_bytes() -> None:
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(1000, 1000 * 1e-6)  # cheap to run...
    assert sizer.next_size(0) > 1000
    sizer.pickled(10, 10 << 20)  # ...but a MiB each as pickled
    assert sizer.next_size(0) == MAX_CHUNK_BYTES // (1 << 20)
    sizer.pickled(1, 64 << 20)  # bigger than the cap: one per chunk
    assert sizer.next_size(0) == 1
