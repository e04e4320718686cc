"""kernels/offload.py's HostPool: host buffers reused by byte size across shapes, within a bound.
Pinned memory needs CUDA; the policy is the same with ordinary memory (pin=False)."""

import torch

from qlora_platform.kernels.offload import HostPool, _round_bytes

MiB = 1 << 20


def test_sizes_round_to_powers_of_two_then_whole_granules():
    assert _round_bytes(1, 2 * MiB) == 512
    assert _round_bytes(3000, 2 * MiB) == 4096
    assert _round_bytes(2 * MiB, 2 * MiB) == 2 * MiB
    assert _round_bytes(2 * MiB + 1, 2 * MiB) == 4 * MiB
    assert _round_bytes(7 * MiB, 2 * MiB) == 8 * MiB


def test_buffers_are_reused_across_shapes_and_dtypes_of_a_size():
    pool = HostPool(limit=None, pin=False, granule=4096)
    a = pool.take(torch.empty(2, 1000, dtype=torch.bfloat16))  # 4000 bytes -> 4096
    assert a.shape == (2, 1000) and a.dtype == torch.bfloat16
    a.fill_(1.5)
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take(torch.empty(3, 333, dtype=torch.float32))  # 3996 bytes: the same buffer
    assert b.data_ptr() == ptr and b.shape == (3, 333) and b.dtype == torch.float32
    c = pool.take(torch.empty(900, dtype=torch.float32))  # the first is lent: a new one
    assert c.data_ptr() != ptr and pool.allocated == 2
    pool.give(b)
    pool.give(c)
    # A smaller request takes a free buffer up to `stretch` times its size, never a smaller one.
    d = pool.take(torch.empty(1500, dtype=torch.uint8))  # 2048 bytes: a 4096 one fits
    assert pool.allocated == 2 and d.numel() == 1500
    e = pool.take(torch.empty(5000, dtype=torch.uint8))  # larger than any: allocated
    assert pool.allocated == 3 and e.numel() == 5000


def test_a_run_of_changing_shapes_holds_no_more_than_the_bound():
    limit = 10 * 8192
    pool = HostPool(limit=limit, pin=False, granule=8192)
    for step in range(50):
        width = 100 + 37 * step  # a new shape every step
        views = [pool.take(torch.empty(4, width, dtype=torch.bfloat16)) for _ in range(3)]
        for v in views:
            v.zero_()
            pool.give(v)
        assert pool.held <= limit
    assert pool.released > 0  # least recently used went first
    assert sum(len(b) for b in pool.free.values()) * 512 <= pool.held <= limit


def test_lent_buffers_beyond_the_bound_come_unpooled_and_are_dropped():
    pool = HostPool(limit=3 * 4096, pin=False, granule=4096)
    lent = [pool.take(torch.empty(4096, dtype=torch.uint8)) for _ in range(4)]
    assert pool.held == 3 * 4096 and pool.unpooled == 1  # the fourth is outside the pool
    for v in lent:
        pool.give(v)
    assert sum(len(b) for b in pool.free.values()) == 3 and pool.held == 3 * 4096
    again = [pool.take(torch.empty(1000, dtype=torch.float32)) for _ in range(3)]
    assert all(v.numel() == 1000 for v in again)
    assert pool.allocated == 3 and pool.unpooled == 1  # all three reused


def test_least_recently_given_back_is_released_first():
    pool = HostPool(limit=2 * 4096, pin=False, granule=4096, stretch=1.0)
    a, b = pool.take(torch.empty(4096, dtype=torch.uint8)), pool.take(torch.empty(4096, dtype=torch.uint8))
    pool.give(a)
    pool.give(b)
    big = pool.take(torch.empty(8192, dtype=torch.uint8))  # needs room: both idle ones go
    assert pool.held == 8192 and pool.released == 2
    pool.give(big)
    small = pool.take(torch.empty(4096, dtype=torch.uint8))  # stretch 1: the 8 KiB one won't do
    assert pool.released == 3 and pool.held == 4096 and small.numel() == 4096
