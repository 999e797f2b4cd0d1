"""The scheduler: continuous batching, paged KV block manager, prefix cache (the "Engine" issue).

It never imports `worker`: it drives workers through an Executor (DESIGN.md §1–2).
"""
