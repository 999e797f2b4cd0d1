"""What a scheduler checks before it takes a request, and the test hook for poison requests.

A request that reaches a scheduler was validated by a gateway, but a scheduler must not trust
that (an older gateway, another client of Redis, a bug): a value it cannot process would
otherwise raise in the middle of a step, for every request in it, and take the process down
with them (DESIGN.md §4, "a poison request hurts nobody else"). ``check_admissible`` runs the
conversions a step will run, so such a request is refused at intake, alone.

The test hook: with ``TESSERA_TEST_POISON=<marker>`` in a scheduler's environment, a step that
holds a sequence whose request id contains ``<marker>`` raises ``PoisonedForTest`` when it is
sent, the deepest place a request's processing can fail; ``exit:<marker>`` instead ends the
process at once (an uncatchable crash, for re-delivery and dead-letter tests). The variable is
read once, at import; unset (always, outside tests) the hook costs one ``is None`` per step.
"""

from __future__ import annotations

import os

from common.convert import sampling_params_to_proto
from common.redis_schema import QueuedRequest
from common.sampling_params import INT32_MAX
from common.step import StepPlan

POISON_ENV = "TESSERA_TEST_POISON"
_POISON = os.environ.get(POISON_ENV) or None


class PoisonedForTest(RuntimeError):
    """Raised by the TESSERA_TEST_POISON hook; never outside tests."""


def check_admissible(queued: QueuedRequest) -> None:
    """Raise ValueError if a step could not carry ``queued`` to the workers."""
    # The executor converts the params for every step that introduces the sequence; protobuf
    # refuses out-of-range integers there (e.g. a seed of 2**63 or a top_k of 2**31).
    sampling_params_to_proto(queued.params)
    bad = next((t for t in queued.prompt_token_ids if t > INT32_MAX), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} does not fit the worker protocol (int32)")


def check_plan_for_test_poison(plan: StepPlan) -> None:
    """The TESSERA_TEST_POISON hook (see the module docstring); a no-op when it is unset."""
    if _POISON is None:
        return
    exit_mode = _POISON.startswith("exit:")
    marker = _POISON[5:] if exit_mode else _POISON
    for seq in plan.new:
        if marker in seq.seq_id:
            if exit_mode:
                os._exit(70)
            raise PoisonedForTest(f"test hook {POISON_ENV}: request {seq.seq_id} is poisoned")
