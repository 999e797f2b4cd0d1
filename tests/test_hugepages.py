"""The CPU KV cache's tensors on transparent huge pages (worker/hugepages.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from worker.hugepages import HUGE_PAGE, huge_page_zeros

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages of the mapping of this process that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_page_zeros_is_a_zeroed_contiguous_tensor(dtype):
    t = huge_page_zeros((37, 16, 3, 64), dtype)   # not a whole number of huge pages
    assert t.shape == (37, 16, 3, 64) and t.dtype == dtype and t.is_contiguous()
    assert t.count_nonzero() == 0
    t.fill_(1)   # every element writable, the tensor its own (no aliasing with another)
    assert t.sum(dtype=torch.float64).item() == t.numel()
    small = huge_page_zeros((4, 4), dtype)
    assert small.count_nonzero() == 0 and small.shape == (4, 4)


@pytest.mark.skipif(sys.platform != "linux" or not THP.exists()
                    or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_large_cache_tensor_gets_huge_pages():
    t = huge_page_zeros((4 * HUGE_PAGE // 4,), torch.float32)   # 16 MiB
    first = t.data_ptr() + (-t.data_ptr() % HUGE_PAGE)
    assert _anon_huge_kib(first) >= HUGE_PAGE // 1024, \
        "madvise(MADV_HUGEPAGE) then the first touch should fault in 2 MiB pages"


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_HUGEPAGES", "0")
    t = huge_page_zeros((4 * HUGE_PAGE // 4,), torch.float32)
    assert t.count_nonzero() == 0 and t.untyped_storage().nbytes() == 4 * HUGE_PAGE
