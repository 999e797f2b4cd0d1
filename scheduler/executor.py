"""How the scheduler runs a step: the Executor protocol and its gRPC implementation.

The in-process executor (a local model runner) lives in `tessera/engine.py`, because the
scheduler never imports worker code; this one talks to a worker group over gRPC. A group of
one worker for now: the step goes to every worker, the sampled tokens come from the one
that samples.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from common.convert import step_output_from_proto, step_plan_to_proto
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from common.step import StepOutput, StepPlan


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

    def _call(self, method: str, request, timeout: float):
        results = []
        for address, stub in zip(self.addresses, self._stubs):
            try:
                results.append(getattr(stub, method)(request, timeout=timeout))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
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
        return min(r.num_blocks for r in self._call("Warmup", request, timeout))

    def reset(self, timeout: float = 10.0) -> None:
        self._call("Reset", worker_pb2.ResetRequest(), timeout)

    def execute(self, plan: StepPlan) -> StepOutput:
        outputs = self._call("Execute", step_plan_to_proto(plan), self.step_timeout_s)
        return step_output_from_proto(outputs[-1])

    def close(self) -> None:
        for c in self._channels:
            c.close()
