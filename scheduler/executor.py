"""How the scheduler runs a step: the Executor protocol and its gRPC implementation.

The in-process executor (a local model runner) lives in `tessera/engine.py`, because the
scheduler never imports worker code; this one talks to a worker group of TP x PP workers
over gRPC.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.convert import step_output_from_proto, step_plan_to_proto
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from common.step import FENCED_DETAIL, StepOutput, StepPlan
from common.telemetry import step_metadata
from scheduler.fence import Fenced

logger = logging.getLogger(__name__)


WARMUP_FIRST = "Warmup first"   # a worker's answer to Execute before Warmup (it restarted)


class StepHandle(Protocol):
    """A step sent to the workers; ``result()`` waits for its output (raises WorkerUnavailable
    or WorkerMismatch). Blocking: an async caller waits for it in a thread."""

    def result(self) -> StepOutput: ...


class Executor(Protocol):
    """How the engine core's steps reach the workers: GrpcExecutor (a worker group over gRPC),
    tessera.engine.LocalExecutor (a worker in this process)."""

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Profile a worst-case step, size the KV cache; the number of KV blocks."""
        ...

    def execute_async(self, plan: StepPlan) -> StepHandle:
        """Send a step now (steps run in step-id order; a pipeline keeps several in flight)."""
        ...

    def execute(self, plan: StepPlan) -> StepOutput:
        """``execute_async(plan).result()``."""
        ...

    def reset(self) -> None:
        """Make the workers forget every sequence (after a mismatch or a failure)."""
        ...

    def close(self) -> None: ...


class WorkerUnavailable(RuntimeError):
    """A worker did not answer (dead, restarting or wedged): the step's requests must fail
    or wait for recovery; the scheduler itself keeps running."""


class WorkerMismatch(RuntimeError):
    """The worker's view of the sequences differs from ours: Reset it and resend in full."""


class GrpcExecutor:
    """Drives one worker group: every call goes to every worker at once (their collectives
    need all ranks), the first failure fails the call without waiting for the others (a rank
    stuck on a dead peer would otherwise hold the step until its timeout), and the sampled
    tokens come from the driver: the last pipeline stage's tensor-parallel rank 0."""

    def __init__(self, addresses: list[str], step_timeout_s: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, epoch: int = 0) -> None:
        """``credentials``: mutual TLS to the workers (common.tls); None: plaintext."""
        if not addresses:
            raise ValueError("a worker group needs at least one worker address")
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self.epoch = epoch   # our lease's (scheduler.fence): workers refuse an older one
        self._channels = [_channel(a, credentials, [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # A restarted worker must be found within a second, not after gRPC's default
            # reconnect backoff (up to 2 minutes): recovery waits on it.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)]) for a in addresses]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        self._watches: list = [None] * len(self._channels)   # see _keep_polling
        self.driver = len(addresses) - 1   # until info() says which one samples
        self._warmup: worker_pb2.WarmupRequest | None = None
        self.num_blocks = 0
        self._cold: set[str] = set()   # workers that answered "Warmup first": they restarted

    def _keep_polling(self) -> None:
        """Hold one health Watch open per worker channel.

        NOTE: a sync channel's ``future()`` polls its calls on a thread that lives while the
        channel has a call in flight: the steps, one after the other, each started a new
        thread (measured: a fifth of the scheduler's CPU time per request at low load, on
        the path of every step). The watch (the worker's liveness, which changes only when
        it stops) keeps that thread; one that ended (a worker restarted) is opened again."""
        for k, channel in enumerate(self._channels):
            watch = self._watches[k]
            if watch is False:
                continue   # a server without health checking: steps spawn their threads
            if watch is not None and watch.done():
                if watch.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._watches[k] = False
                    continue
                watch = None
            if watch is None:
                self._watches[k] = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=""))

    def submit(self, method: str, request, timeout: float, wait_for_ready: bool = False,
               metadata=None, answer=None) -> "GroupCall":
        self._keep_polling()
        return GroupCall(self.addresses, [
            getattr(stub, method).future(request, timeout=timeout, wait_for_ready=wait_for_ready,
                                         metadata=metadata)
            for stub in self._stubs], timeout, self._cold, answer)

    def _call(self, method: str, request, timeout: float) -> list:
        return self.submit(method, request, timeout).result()

    def info(self, timeout: float = 10.0) -> list[worker_pb2.InfoResponse]:
        """Every worker's shard (waiting up to `timeout` for workers still starting); checks
        that they form one complete group and finds the driver."""
        infos = self.submit("Info", worker_pb2.InfoRequest(), timeout, wait_for_ready=True).result()
        tp, pp = infos[0].tp_size, infos[0].pp_size
        ranks = sorted((i.pp_rank * tp + i.tp_rank, a) for i, a in zip(infos, self.addresses))
        if any(i.tp_size != tp or i.pp_size != pp for i in infos) or \
                [r for r, _ in ranks] != list(range(len(infos))) or tp * pp != len(infos):
            shards = ", ".join(f"{a}: tp {i.tp_rank}/{i.tp_size} pp {i.pp_rank}/{i.pp_size}"
                               for i, a in zip(infos, self.addresses))
            raise ValueError(f"the workers do not form one {tp}x{pp} group: {shards}")
        self.driver = next(k for k, i in enumerate(infos) if i.pp_rank == pp - 1 and i.tp_rank == 0)
        return infos

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int,
               timeout: float = 600.0) -> int:
        """Warm every worker; the group's KV capacity is the minimum over its workers."""
        request = worker_pb2.WarmupRequest(max_num_batched_tokens=max_num_batched_tokens,
                                           max_num_seqs=max_num_seqs, lease_epoch=self.epoch)
        self._warmup = request
        self.num_blocks = min(r.num_blocks for r in self._call("Warmup", request, timeout))
        return self.num_blocks

    def reset(self, timeout: float = 10.0) -> None:
        if self._cold:
            self._rewarm()
        self._call("Reset", worker_pb2.ResetRequest(lease_epoch=self.epoch), timeout)

    def recover(self, timeout: float = 10.0) -> bool:
        """After the group failed: re-warm every worker (a restarted one lost its KV cache;
        a warm one sizes it again the same) and reset them all. True when the whole group
        answers and is warm again; raises WorkerUnavailable while it does not answer."""
        self._cold.update(self.addresses)
        self.reset(timeout)
        return not self._cold

    def _rewarm(self, timeout: float = 600.0) -> None:
        """Restarted workers lost their KV cache: warm them up again, as at start. A group
        restarts as a whole (a rank that loses a peer exits), and its ranks meet in the
        warm-up's collectives: so every worker is warmed, all at once. On failure they stay
        cold: steps keep failing, and readiness says so."""
        self._cold.update(self.addresses)
        try:   # all of them up first: a rank warmed alone would wait for its peers' collectives
            self.submit("Info", worker_pb2.InfoRequest(), 10.0, wait_for_ready=True).result()
        except (WorkerUnavailable, WorkerMismatch) as e:
            logger.warning("not every worker of the group is back yet: %s", e)
            return
        calls = [(a, stub.Warmup.future(self._warmup, timeout=timeout))
                 for a, stub in zip(self.addresses, self._stubs)]
        for address, call in calls:
            try:
                num_blocks = call.result().num_blocks
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
        return self.execute_async(plan).result()

    def execute_async(self, plan: StepPlan) -> "GroupCall":
        """Send a step to the group now; `.result()` waits for it and gives the driver's
        StepOutput (pipelining keeps several in flight: the workers run them in step-id order)."""
        driver = self.driver
        step = step_plan_to_proto(plan)
        step.lease_epoch = self.epoch
        return self.submit("Execute", step, self.step_timeout_s,
                           metadata=step_metadata(plan.trace_context) or None,
                           answer=lambda replies: step_output_from_proto(replies[driver]))

    def close(self) -> None:
        for w in self._watches:
            if w:
                w.cancel()
        for c in self._channels:
            c.close()


def _channel(address: str, credentials: grpc.ChannelCredentials | None,
             options: list) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


class GroupCall:
    """One RPC to every worker of a group (the one fan-out), completing when all answered or
    one failed. ``result()`` gives every reply, or ``answer(replies)`` when given."""

    def __init__(self, addresses: list[str], futures: list, timeout: float,
                 cold: set[str] | None = None, answer=None) -> None:
        self.addresses, self.futures, self.timeout = addresses, futures, timeout
        self._answer = answer
        self._cold = cold if cold is not None else set()
        self._lock = threading.Lock()
        self._left = len(futures)
        self._done = threading.Event()
        for f in futures:
            f.add_done_callback(self._on_done)

    def _on_done(self, future) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0 or future.exception() is not None:
                self._done.set()

    def result(self):
        if not self._done.wait(self.timeout + 1.0):
            self.cancel()
            raise WorkerUnavailable(f"the worker group did not answer within {self.timeout} s")
        failed = [(a, f.exception()) for a, f in zip(self.addresses, self.futures)
                  if f.done() and f.exception() is not None]
        if failed:
            self.cancel()
            if any(e.code() == grpc.StatusCode.ABORTED and e.details() == FENCED_DETAIL
                   for _, e in failed):
                raise Fenced(f"a worker refused our lease epoch: {FENCED_DETAIL}")
            # A mismatch only counts when nobody is gone: a dead peer makes others fail too.
            for a, e in failed:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and e.details() == WARMUP_FIRST:
                    self._cold.add(a)   # it restarted: warm it up again before the Reset
            if all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for _, e in failed):
                raise WorkerMismatch("; ".join(f"{a}: {e.details()}" for a, e in failed))
            raise WorkerUnavailable("; ".join(f"{a}: {e.code().name} {e.details()}"
                                              for a, e in failed))
        replies = [f.result() for f in self.futures]
        return replies if self._answer is None else self._answer(replies)

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()
