"""The scheduler: the engine core (requests of n sequences, their events), continuous batching,
paged KV block manager, prefix cache, and the service's Redis loop around the core.

It never imports `worker`: it drives workers through an Executor (DESIGN.md §1–2).
"""
