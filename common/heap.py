"""What a service does with Python's heap once it is ready to serve.

NOTE: a service's startup leaves hundreds of thousands of long-lived objects tracked by the
cyclic garbage collector (a worker's model modules and loader tables, a gateway's tokenizer
and app), and every full collection walks all of them again: in the worker one took ~70 ms,
a stall of every request in the step it lands in, and the gateway spent ~0.1 CPU-s in its
two over a 128-stream batch (benchmarks/serving_overhead.py, 2 cores, with gc.callbacks
timing each collection). ``gc.freeze()`` moves what exists at that point into a generation
the collector never scans; objects made later are collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect startup's garbage, then exclude every surviving object from later
    collections; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
