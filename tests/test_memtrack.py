"""track_memory: counts new tensor storage once, frees it when the storage dies, ignores what existed before."""

import torch

from dgemma.bench.memtrack import track_memory

MB4 = 1000 * 1000 * 4  # one [1000, 1000] fp32 tensor


def test_one_allocation():
    with track_memory() as m:
        x = torch.zeros(1000, 1000)
    assert MB4 <= m.peak_bytes < MB4 + 1000
    assert m.allocated_bytes == m.total_bytes == m.peak_bytes  # still held by x
    assert m.allocations == 1
    del x


def test_freed_in_a_loop_does_not_accumulate():
    with track_memory() as m:
        for _ in range(10):
            y = torch.ones(1000, 1000)
            s = y.sum()
            del y
    assert MB4 <= m.peak_bytes < MB4 + 1000  # one tensor at a time, not ten
    assert m.total_bytes >= 10 * MB4
    assert m.allocated_bytes == s.nbytes  # only the last sum is still alive


def test_reassignment_peaks_at_two():
    with track_memory() as m:
        x = torch.ones(1000, 1000)
        for _ in range(5):
            x = x + 1  # the new tensor exists before the old one is released
    assert 2 * MB4 <= m.peak_bytes < 2 * MB4 + 1000
    assert m.allocated_bytes == MB4


def test_nothing_new_counts_zero():
    a = torch.zeros(1000, 1000)  # before the block: never counted
    with track_memory() as m:
        a.add_(1)
        a.view(-1)[:10].mul_(2)
        b = a.t()
        b[0].zero_()
        _ = a[5:]
    assert m.peak_bytes == m.allocated_bytes == m.total_bytes == 0
    assert float(a[1, 1]) == 1.0  # the ops ran


def test_views_and_in_place_ops_count_once():
    with track_memory() as m:
        x = torch.zeros(1000, 1000)
        x.add_(1)
        v = x.view(-1)
        v.mul_(3)
        x[0].zero_()
        x.t().unsqueeze(0)
    assert MB4 <= m.peak_bytes < MB4 + 1000
    assert m.allocations == 1
    del x, v


def test_inference_mode():
    w = torch.randn(1000, 1000)
    with torch.inference_mode(), track_memory() as m:
        y = torch.relu_(w @ w)  # matmul allocates, relu_ works in place
        del y
    assert MB4 <= m.peak_bytes < MB4 + 1000
    assert m.allocated_bytes == 0


def test_out_argument_resize_is_measured():
    a = torch.ones(1000, 1000)
    with track_memory() as m:
        out = torch.empty(0)
        torch.add(a, 1, out=out)  # resizes `out` from 0 to 4 MB
    assert MB4 <= m.peak_bytes < MB4 + 1000 and m.allocated_bytes == MB4
    del out


def test_figures_freeze_at_the_end_and_nesting_works():
    with track_memory() as outer:
        with track_memory() as inner:
            x = torch.zeros(1000, 1000)
        y = torch.zeros(500, 1000)
    del x, y
    assert inner.allocated_bytes == MB4 and inner.peak_bytes == MB4  # frozen: the later `del` is not counted
    assert outer.peak_bytes == MB4 + MB4 // 2


def test_only_the_chosen_device_counts():
    with track_memory(device="meta") as m:
        torch.zeros(1000, 1000)  # on the CPU: not counted
        z = torch.zeros(1000, 1000, device="meta")
    assert m.peak_bytes == MB4 and z.is_meta
