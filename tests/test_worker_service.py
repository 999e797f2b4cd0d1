"""The worker service as a real process over real gRPC: warm-up sizes the KV cache, a step
diff produces the same tokens as the in-process worker, and a mismatch is refused."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from common.convert import step_output_from_proto, step_plan_to_proto
from common.model_config import ModelConfig
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from common.sampling_params import SamplingParams
from common.step import NewSequence, RunningSequence, StepPlan
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.executor import GrpcExecutor
from scheduler.scheduler import SchedulerConfig
from tessera import LLM
from tessera.procs import free_port
from worker.runner import ModelRunner
from worker.worker import Worker

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def worker_stub(tiny_model):
    model_dir = str(tiny_model("llama"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "worker", "--model", model_dir, "--port", str(port),
         "--kv-cache-memory-gb", "0.001", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    deadline = time.monotonic() + 60
    while True:
        try:
            stub.Info(worker_pb2.InfoRequest(), timeout=1)
            break
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"worker did not start:\n{proc.stdout.read()}")
            time.sleep(0.2)
    stub.address = f"127.0.0.1:{port}"
    yield model_dir, stub
    channel.close()
    proc.terminate()
    proc.wait(timeout=10)


def _plans() -> list[StepPlan]:
    prompt = list(range(30, 70))
    return [
        StepPlan(1, new=[NewSequence("a", prompt, 40, 0, 24, [3, 1], GREEDY),
                         NewSequence("b", prompt[:5], 5, 0, 5, [0], GREEDY)]),
        # the tokens "sampled" in the previous step travel in the delta (any ids will do)
        StepPlan(2, running=[RunningSequence("a", 24, 16, [2, 4]),
                             RunningSequence("b", 5, 1, [], [11])]),
        StepPlan(3, running=[RunningSequence("a", 40, 1, [], [12]),
                             RunningSequence("b", 6, 1, [], [13])]),
    ]


def test_execute_matches_the_in_process_worker(worker_stub):
    model_dir, stub = worker_stub
    info = stub.Info(worker_pb2.InfoRequest())
    assert info.block_size == 16 and info.layer_end == 2 and info.vocab_size == 512
    warm = stub.Warmup(worker_pb2.WarmupRequest(max_num_batched_tokens=64, max_num_seqs=4))
    assert warm.num_blocks == int(0.001 * (1 << 30)) // warm.block_bytes and warm.num_blocks > 8
    local = Worker(ModelRunner(ModelConfig.from_dir(model_dir), num_blocks=8, block_size=16))
    for plan in _plans():
        remote = step_output_from_proto(stub.Execute(step_plan_to_proto(plan)))
        expected = local.execute(plan)
        assert {k: v.token_id for k, v in remote.sampled.items()} == \
            {k: v.token_id for k, v in expected.sampled.items()}
    assert set(remote.sampled) == {"a", "b"}


def test_a_second_warmup_gives_the_same_blocks_and_the_worker_serves(worker_stub):
    """Schedulers warm again after every restart: the cache is sized afresh, not around the
    old one, and the worker starts over at step 1."""
    _, stub = worker_stub
    request = worker_pb2.WarmupRequest(max_num_batched_tokens=64, max_num_seqs=4)
    first = stub.Warmup(request)
    stub.Execute(step_plan_to_proto(_plans()[0]))
    second = stub.Warmup(request)
    assert (second.num_blocks, second.block_bytes) == (first.num_blocks, first.block_bytes)
    assert second.num_blocks > 8
    out = step_output_from_proto(stub.Execute(step_plan_to_proto(_plans()[0])))
    assert set(out.sampled) == {"b"}


def test_mismatch_is_failed_precondition_and_reset_recovers(worker_stub):
    _, stub = worker_stub
    stub.Warmup(worker_pb2.WarmupRequest(max_num_batched_tokens=64, max_num_seqs=4))
    plans = _plans()
    stub.Execute(step_plan_to_proto(plans[0]))
    bad = StepPlan(2, running=[RunningSequence("a", 99, 1, [])])   # wrong computed count
    with pytest.raises(grpc.RpcError) as err:
        stub.Execute(step_plan_to_proto(bad))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:   # step ids must increase
        stub.Execute(step_plan_to_proto(plans[0]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.Reset(worker_pb2.ResetRequest())
    out = step_output_from_proto(stub.Execute(step_plan_to_proto(plans[0])))
    assert set(out.sampled) == {"b"}   # "a" is mid-prompt after 24 of 40 tokens


def test_scheduler_core_drives_the_remote_worker_like_the_offline_engine(worker_stub):
    """The service's loop without Redis: schedule -> GrpcExecutor.execute -> update."""
    model_dir, stub = worker_stub
    executor = GrpcExecutor([stub.address])
    num_blocks = executor.warmup(max_num_batched_tokens=64, max_num_seqs=8)
    sched = EngineCore(SchedulerConfig(num_blocks=min(num_blocks, 24), block_size=16,
                                       max_num_batched_tokens=64, max_model_len=512))
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 90, 17)]
    for i, p in enumerate(prompts):
        sched.add_request(EngineRequest(str(i), p, GREEDY))
    tokens: dict[str, list[int]] = {}
    while sched.has_unfinished:
        plan = sched.schedule()
        for req, ev in sched.update(plan, executor.execute(plan)):
            tokens.setdefault(req.request_id, []).extend(ev.token_ids)
    executor.close()
    expected = LLM(model_dir, num_kv_blocks=64).generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [tokens[str(i)] for i in range(len(prompts))] == [o.outputs[0].token_ids for o in expected]
    assert sched.kv.num_blocks_in_use == 0


def test_the_serving_worker_prepares_structured_output_at_start(tiny_model):
    """The sampling rank imports xgrammar and builds the tokenizer's tables when it starts,
    so the first structured sequence does not hold up the step it shares with others."""
    from common.config import WorkerConfig
    from worker.service import WorkerServicer

    servicer = WorkerServicer(WorkerConfig(model=str(tiny_model("llama"))))
    assert servicer.worker.is_driver
    servicer.grammars_ready.result(timeout=120)
    backend = servicer.worker.grammars
    assert backend._compiler is not None and backend._compiler._compiler is not None
