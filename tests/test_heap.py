"""common.heap: a ready service's startup objects leave the collector's scans; garbage made
afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

from common.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self   # a reference cycle: only the cyclic collector frees it


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    before = _Node()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())   # no generation scans it
        later = _Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()   # other tests share this process
    assert any(o is before for o in gc.get_objects())
