"""The gRPC contracts: committed stubs match the .proto sources, and common/convert.py carries
every dataclass field across the wire and back without changing it."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.convert import (sampling_params_from_proto, sampling_params_to_proto,
                            step_output_from_proto, step_output_to_proto, step_plan_from_proto,
                            step_plan_to_proto)
from common.proto.tessera.v1 import generate_pb2, worker_pb2
from common.sampling_params import SamplingParams
from common.step import NewSequence, RunningSequence, SampledToken, StepOutput, StepPlan

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUBS = ROOT / "common" / "proto"
INT32 = st.integers(0, 2**31 - 1)
FLOAT32 = st.floats(width=32, allow_nan=False)   # what the sampler produces: exact on the wire

# --- (a) committed stubs == a fresh protoc run -----------------------------------------------

# protoc stamps its own version into the stubs (and a check of it at import). Those lines are
# masked, so the test asks "do the stubs match the .proto sources?" and still passes for a
# developer with a newer grpcio-tools; everything else must be byte-for-byte equal.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <v>"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)"
                r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"), r"\1 <v>,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '<v>'"),
]


def _normalised(path: pathlib.Path) -> str:
    text = path.read_text()
    for pattern, repl in _VERSION_STAMPS:
        text, count = pattern.subn(repl, text)
        assert count <= 2, f"{path.name}: unexpected version stamp layout"
    return text


def _generated(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*_pb2*.py*"))}


def test_committed_stubs_equal_a_fresh_protoc_run(tmp_path: pathlib.Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
    fresh, committed = _generated(tmp_path), _generated(STUBS)
    assert sorted(fresh) == sorted(committed), "run scripts/gen_proto.sh and commit the result"
    for name, path in fresh.items():
        assert _normalised(path) == _normalised(committed[name]), \
            f"{name} is stale: run scripts/gen_proto.sh and commit the result"


def test_pyproject_floors_cover_the_stubs_version_checks() -> None:
    """The stubs refuse older runtimes at import; pyproject must not promise them."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+).*", d).groups() for d in deps if ">=" in d)
    stub = (STUBS / "tessera/v1/worker_pb2.py").read_text()
    protobuf = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", stub).groups()
    grpc = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                     (STUBS / "tessera/v1/worker_pb2_grpc.py").read_text()).group(1)

    def v(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in s.split("."))
    assert v(floors["protobuf"]) >= tuple(int(x) for x in protobuf)
    assert v(floors["grpcio"]) >= v(grpc)


def test_services_have_the_contracted_methods() -> None:
    gen = generate_pb2.DESCRIPTOR.services_by_name["Generate"]
    assert gen.full_name == "tessera.v1.Generate"
    assert set(gen.methods_by_name) == {"Generate", "GenerateStream", "Tokenize", "ListModels",
                                        "Cancel"}
    assert gen.methods_by_name["GenerateStream"].server_streaming
    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert set(worker.methods_by_name) == {"Info", "Warmup", "Execute", "Reset"}
    assert worker.methods_by_name["Execute"].input_type.name == "StepInput"


# --- (d) field coverage ----------------------------------------------------------------------

def test_every_sampling_param_has_a_proto_field_with_presence() -> None:
    """Adding a SamplingParams field without its proto field (or the reverse) fails here. Every
    scalar must have presence, so that an absent field means the dataclass default."""
    msg_fields = generate_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert set(msg_fields) == {f.name for f in fields(SamplingParams)}
    for name, fd in msg_fields.items():
        repeated = fd.is_repeated   # repeated fields and maps: empty means the default
        assert repeated or fd.has_presence, f"SamplingParams.{name} must be `optional`"


def test_step_dataclasses_have_the_fields_convert_py_carries() -> None:
    """A tripwire: a new field on a step dataclass needs a proto field and a line in
    common/convert.py; update both, then this list."""
    assert [f.name for f in fields(NewSequence)] == [
        f.name for f in worker_pb2.NewSequence.DESCRIPTOR.fields]
    assert [f.name for f in fields(RunningSequence)] == [
        "seq_id", "num_computed_tokens", "num_scheduled_tokens", "new_block_ids", "new_token_ids",
        "draft_token_ids"]
    # trace_context rides as the Execute call's gRPC metadata (common.telemetry.step_metadata),
    # not in StepInput: it is not the step's content, and only exists while tracing.
    assert [f.name for f in fields(StepPlan)] == [
        "step_id", "new", "running", "finished_ids", "preempted_ids", "trace_context"]
    assert [f.name for f in fields(SampledToken)] == ["token_id", "logprob", "top_logprobs"]
    assert [f.name for f in fields(StepOutput)] == ["step_id", "sampled", "prompt_logprobs",
                                                    "extra_sampled", "deferred"]


# --- (b) round trips -------------------------------------------------------------------------

@st.composite
def sampling_params(draw: st.DrawFn) -> SamplingParams:
    max_tokens = draw(st.integers(1, 2**31 - 1))
    return SamplingParams(
        n=draw(st.integers(1, 8)),
        temperature=draw(st.floats(0, 5)),
        top_p=draw(st.floats(0, 1, exclude_min=True)),
        top_k=draw(st.integers(-1, 2**31 - 1)),
        min_p=draw(st.floats(0, 1)),
        repetition_penalty=draw(st.floats(0, 10, exclude_min=True)),
        presence_penalty=draw(st.floats(-2, 2)),
        frequency_penalty=draw(st.floats(-2, 2)),
        # An empty dict would come back as None (documented): both mean "no bias".
        logit_bias=draw(st.none() | st.dictionaries(INT32, st.floats(-100, 100), min_size=1,
                                                    max_size=3)),
        seed=draw(st.none() | st.integers(-2**63, 2**63 - 1)),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, min(max_tokens, 2**31 - 1))),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=5), max_size=3))),
        stop_token_ids=tuple(draw(st.lists(INT32, max_size=3))),
        include_stop_str_in_output=draw(st.booleans()),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.none() | st.integers(0, 20)),
        prompt_logprobs=draw(st.none() | st.integers(0, 20)),
        skip_special_tokens=draw(st.booleans()),
    )


SEQ_ID = st.text(min_size=1, max_size=12)
IDS = st.lists(INT32, max_size=40)

new_sequences = st.builds(NewSequence, SEQ_ID, IDS, INT32, INT32, INT32, IDS, sampling_params(),
                          INT32)
running_sequences = st.builds(RunningSequence, SEQ_ID, INT32, INT32, st.lists(INT32, max_size=3),
                              IDS, st.lists(INT32, max_size=4))
step_plans = st.builds(StepPlan, st.integers(0, 2**63 - 1), st.lists(new_sequences, max_size=4),
                       st.lists(running_sequences, max_size=8), st.lists(SEQ_ID, max_size=3),
                       st.lists(SEQ_ID, max_size=3))
top_lists = st.lists(st.tuples(INT32, FLOAT32), max_size=5)
sampled_tokens = st.builds(SampledToken, INT32, st.none() | FLOAT32, st.none() | top_lists)


@st.composite
def step_outputs(draw: st.DrawFn) -> StepOutput:
    sampled = draw(st.dictionaries(SEQ_ID, sampled_tokens, max_size=6))
    # Speculative decoding: extra tokens only for sequences that sampled one.
    extra = {i: draw(st.lists(sampled_tokens, min_size=1, max_size=4)) for i in sampled
             if draw(st.booleans())}
    # Deferred: sequences at a sampling point that were not sampled (never also sampled).
    deferred = draw(st.lists(SEQ_ID.filter(lambda s: s not in sampled), max_size=3, unique=True))
    return StepOutput(draw(st.integers(0, 2**63 - 1)), sampled, draw(st.dictionaries(
        SEQ_ID, st.lists(st.tuples(FLOAT32, top_lists), max_size=4), max_size=2)), extra,
        deferred)


@settings(max_examples=60, deadline=None)
@given(sampling_params())
def test_sampling_params_round_trip(params: SamplingParams) -> None:
    assert sampling_params_from_proto(sampling_params_to_proto(params)) == params


@settings(max_examples=60, deadline=None)
@given(step_plans)
def test_step_plan_round_trip_through_bytes(plan: StepPlan) -> None:
    wire = step_plan_to_proto(plan).SerializeToString()
    assert step_plan_from_proto(worker_pb2.StepInput.FromString(wire)) == plan


@settings(max_examples=60, deadline=None)
@given(step_outputs())
def test_step_output_round_trip_through_bytes(out: StepOutput) -> None:
    wire = step_output_to_proto(out).SerializeToString()
    assert step_output_from_proto(worker_pb2.StepOutput.FromString(wire)) == out


def test_explicit_values_equal_to_proto3_zero_survive() -> None:
    """temperature=0 (greedy) must not turn into the default 1.0 on the way: presence matters."""
    params = SamplingParams(temperature=0.0, top_k=0, skip_special_tokens=False, logprobs=0)
    back = sampling_params_from_proto(sampling_params_to_proto(params))
    assert back.greedy and back.logprobs == 0 and back.skip_special_tokens is False


def test_absent_fields_take_the_dataclass_defaults() -> None:
    assert sampling_params_from_proto(generate_pb2.SamplingParams()) == SamplingParams()
    assert sampling_params_from_proto(generate_pb2.SamplingParams(max_tokens=5)) == \
        SamplingParams(max_tokens=5)


# --- (c) invalid input -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_params_from_a_message_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        sampling_params_from_proto(generate_pb2.SamplingParams(**kwargs))


def test_a_value_the_wire_cannot_hold_names_the_field() -> None:
    with pytest.raises(ValueError, match="^seed "):
        sampling_params_to_proto(SamplingParams(seed=2**64))


def test_misaligned_columns_are_refused() -> None:
    msg = step_plan_to_proto(StepPlan(1, running=[RunningSequence("a", 3, 1, [7])]))
    msg.running.new_block_ids.append(8)          # one block that belongs to no row
    with pytest.raises(ValueError, match="running"):
        step_plan_from_proto(msg)
    out = step_output_to_proto(StepOutput(1, sampled={"a": SampledToken(1)}))
    out.token_ids.append(2)
    with pytest.raises(ValueError, match="token_ids"):
        step_output_from_proto(out)
