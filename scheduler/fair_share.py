"""Fair share between tenants: start-time fair queuing (SFQ) on the waiting queue's order.

Every sequence gets a virtual start tag when it arrives: the later of the tenant's previous
virtual finish and the scheduler's virtual time (the tag of the last sequence admitted to
run); its finish is start + cost / weight, cost being what it may ask of the engine (prompt +
max_tokens). The waiting queue and the preemption order sort by (priority, tag, arrival), so
a tenant that floods the queue only pushes its own later requests back: a tenant that arrives
later starts at the current virtual time and is served next, at its weight's rate. With one
tenant the tags grow with arrival and the order is the plain (priority, arrival) FCFS.

NOTE: the order applies to what this scheduler has read from Redis (the request stream is
FIFO). A scheduler whose group is the model's only one reads up to --max-waiting-requests
into its waiting queue, so fairness holds among that many; with several groups each reads
only as many as it has sequence slots (the others may have room for the rest), so fairness
holds among up to max_num_seqs requests at a time per group.
"""

from __future__ import annotations


class FairShare:
    def __init__(self) -> None:
        self.vtime = 0.0
        self._finish: dict[str, float] = {}   # tenant -> virtual finish of its last arrival

    def tag(self, tenant: str, weight: float, cost: int) -> float:
        """The virtual start tag of a new sequence of ``tenant`` costing ``cost`` tokens."""
        start = max(self.vtime, self._finish.get(tenant, 0.0))
        self._finish[tenant] = start + max(cost, 1) / max(weight, 1e-3)
        return start

    def started(self, tag: float) -> None:
        """A sequence with ``tag`` was admitted to run: virtual time moves up to it."""
        if tag > self.vtime:
            self.vtime = tag
            if len(self._finish) > 1024:   # forget tenants whose last request lies behind
                self._finish = {t: f for t, f in self._finish.items() if f > tag}
