"""CPU tensors on transparent huge pages, for the KV cache.

A decode step reads every running sequence's K/V once, hundreds of MB scattered over cache
blocks: on 4 KiB pages nearly every 4 KiB read is also a TLB miss (the CPU's TLB covers a few
MiB). Where the kernel's transparent huge pages are in `madvise` mode (Debian's default) a
region gets 2 MiB pages only if it asks, before it is first touched: `huge_page_zeros` maps
fresh anonymous memory (2 MiB more than it needs), asks for huge pages on the 2 MiB-aligned
part with madvise(MADV_HUGEPAGE), then zeroes it (the first touch). A fresh mapping, not the
allocator's: memory malloc hands back again was touched already, and stays on small pages.
Measured on an AMD EPYC (2 cores, 32 MiB L3), decode attention at 64 x 512 over four layers'
caches: 1.10x (fp32 cache) and 1.04x (fp16) against the same kernel on 4 KiB pages,
alternating.

Linux only; anywhere else, when mmap fails, for small tensors or with
`TESSERA_CPU_HUGEPAGES=0`, it is `torch.zeros`. Transparent huge pages set to `never` make
the advice a no-op; set to `always`, the kernel gives aligned regions huge pages anyway.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20


def hugepages_wanted() -> bool:
    return (sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get("TESSERA_CPU_HUGEPAGES", "1") != "0")


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor whose 2 MiB-aligned whole pages were advised huge."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not hugepages_wanted() or nbytes < 2 * HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    try:
        # private: a shared anonymous mapping is shmem, under shmem's THP policy (often never);
        # the tensor keeps the mapping alive
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError) as e:
        logger.debug("no anonymous mapping of %d bytes: %s", nbytes, e)
        return torch.zeros(shape, dtype=dtype)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError as e:   # still a zeroed tensor, on small pages
        logger.debug("madvise(MADV_HUGEPAGE) failed: %s", e)
    out = raw[offset:offset + nbytes].view(dtype).view(shape)
    out.zero_()   # the first touch: faulted in as huge pages
    return out
