"""How the scheduler runs a step: the Executor protocol and its gRPC implementation.

The in-process executor (a local model runner) lives in `tessera/engine.py`, because the
scheduler never imports worker code; this one talks to a worker group over gRPC. A group of
one worker for now: the step goes to every worker, the sampled tokens come from the one
that samples.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from common.convert import step_output_from_proto, step_plan_to_proto
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from common.step import StepOutput, StepPlan
from common.telemetry import step_metadata

logger = logging.getLogger(__name__)


WARMUP_FIRST = "Warmup first"   # a worker's answer to Execute before Warmup (it restarted)


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepOutput: ...


class WorkerUnavailable(RuntimeError):
    """A worker did not answer (dead, restarting or wedged): the step's requests must fail
    or wait for recovery; the scheduler itself keeps running."""


class WorkerMismatch(RuntimeError):
    """The worker's view of the sequences differs from ours: Reset it and resend in full."""


class GrpcExecutor:
    def __init__(self, addresses: list[str], step_timeout_s: float = 30.0) -> None:
        if not addresses:
            raise ValueError("a worker group needs at least one worker address")
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self._channels = [grpc.insecure_channel(a, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]) for a in addresses]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        self._warmup: worker_pb2.WarmupRequest | None = None
        self.num_blocks = 0
        self._cold: set[str] = set()   # workers that answered "Warmup first": they restarted

    def _call(self, method: str, request, timeout: float, metadata=None):
        results = []
        for address, stub in zip(self.addresses, self._stubs):
            try:
                results.append(getattr(stub, method)(request, timeout=timeout, metadata=metadata))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    if e.details() == WARMUP_FIRST:
                        self._cold.add(address)
                    raise WorkerMismatch(f"{address}: {e.details()}") from None
                raise WorkerUnavailable(f"{address}: {e.code().name} {e.details()}") from None
        return results

    def info(self, timeout: float = 10.0) -> list[worker_pb2.InfoResponse]:
        return self._call("Info", worker_pb2.InfoRequest(), timeout)

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int,
               timeout: float = 600.0) -> int:
        """Warm every worker; the group's KV capacity is the minimum over its workers."""
        request = worker_pb2.WarmupRequest(max_num_batched_tokens=max_num_batched_tokens,
                                           max_num_seqs=max_num_seqs)
        self._warmup = request
        self.num_blocks = min(r.num_blocks for r in self._call("Warmup", request, timeout))
        return self.num_blocks

    def reset(self, timeout: float = 10.0) -> None:
        if self._cold:
            self._rewarm()
        self._call("Reset", worker_pb2.ResetRequest(), timeout)

    def _rewarm(self, timeout: float = 600.0) -> None:
        """Restarted workers lost their KV cache: warm them up again, as at start. On failure
        they stay cold: steps keep failing, and readiness says so."""
        for address, stub in zip(self.addresses, self._stubs):
            if address not in self._cold:
                continue
            try:
                num_blocks = stub.Warmup(self._warmup, timeout=timeout).num_blocks
            except grpc.RpcError as e:
                logger.error("warming up the restarted worker %s failed: %s", address, e.code())
                continue
            if num_blocks < self.num_blocks:
                logger.error("the restarted worker %s holds %d KV blocks, fewer than the %d the "
                             "scheduler uses: it cannot serve", address, num_blocks, self.num_blocks)
                continue
            logger.info("warmed up the restarted worker %s again", address)
            self._cold.discard(address)

    def execute(self, plan: StepPlan) -> StepOutput:
        outputs = self._call("Execute", step_plan_to_proto(plan), self.step_timeout_s,
                             step_metadata(plan.trace_context) or None)
        return step_output_from_proto(outputs[-1])

    def close(self) -> None:
        for c in self._channels:
            c.close()
