"""The one module that touches generated protobuf classes: messages <-> our dataclasses.

Everything else in Tessera works on the dataclasses of common/step.py and
common/sampling_params.py; services call these functions at the gRPC boundary only, so a
change to the wire format stays in proto/ and here.

Round trips are exact, with two documented normalisations:
- logprobs travel as float32. The sampler computes them in float32, so every value it
  produces survives unchanged; an arbitrary Python float comes back rounded to float32.
- SamplingParams.logit_bias: an empty dict comes back as None (a proto map has no presence;
  both mean "no bias").

Execute runs once per engine step, so the step conversions are written for speed: the decode
path (running sequences, sampled tokens) is parallel packed columns filled from lists in one
call each, and there is one SamplingParams conversion per distinct params object (a request's
n sequences usually share one). benchmarks/step_proto_overhead.py measures it.
"""

from __future__ import annotations

from dataclasses import fields

from common.proto.tessera.v1 import generate_pb2, worker_pb2
from common.sampling_params import SamplingParams
from common.step import NewSequence, RunningSequence, SampledToken, StepOutput, StepPlan

__all__ = [
    "sampling_params_to_proto", "sampling_params_from_proto",
    "step_plan_to_proto", "step_plan_from_proto",
    "step_output_to_proto", "step_output_from_proto",
]

# The proto field names equal the dataclass field names (tests/test_proto.py checks both
# directions), which is what lets both directions below be generic.
_PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
_SEQUENCE_FIELDS = frozenset({"stop", "stop_token_ids"})


# --- SamplingParams -------------------------------------------------------------------------

def sampling_params_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    """Every field that is not None is set explicitly, so the receiver sees the sender's values
    even if the two ever disagree on a default. None leaves the optional field absent."""
    kwargs: dict[str, object] = {}
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if value is not None:
            kwargs[name] = value
    try:
        return generate_pb2.SamplingParams(**kwargs)
    except (ValueError, TypeError):
        # protobuf's own message ("Value out of range: ...") does not name the field; find it.
        for name, value in kwargs.items():
            try:
                generate_pb2.SamplingParams(**{name: value})
            except (ValueError, TypeError) as e:
                raise ValueError(f"{name} cannot be sent over the wire: {e}") from e
        raise


def sampling_params_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    """Absent fields take the dataclass defaults. Raises ValueError naming the field for an
    invalid value (the dataclass validates), which the gateway maps to INVALID_ARGUMENT."""
    kwargs: dict[str, object] = {}
    # ListFields returns only the fields that are set: present optionals, non-empty repeated
    # fields and maps. One call instead of a HasField per field.
    for fd, value in msg.ListFields():
        name = fd.name
        if name in _SEQUENCE_FIELDS:
            value = tuple(value)
        elif name == "logit_bias":
            value = dict(value)
        kwargs[name] = value
    return SamplingParams(**kwargs)


# --- StepPlan <-> StepInput -----------------------------------------------------------------

def step_plan_to_proto(plan: StepPlan) -> worker_pb2.StepInput:
    msg = worker_pb2.StepInput(step_id=plan.step_id, finished_ids=plan.finished_ids,
                               preempted_ids=plan.preempted_ids)
    params_cache: dict[int, generate_pb2.SamplingParams] = {}
    add_new = msg.new.add
    for s in plan.new:
        p = params_cache.get(id(s.params))
        if p is None:
            p = params_cache[id(s.params)] = sampling_params_to_proto(s.params)
        add_new(seq_id=s.seq_id, token_ids=s.token_ids, num_prompt_tokens=s.num_prompt_tokens,
                num_computed_tokens=s.num_computed_tokens,
                num_scheduled_tokens=s.num_scheduled_tokens, block_ids=s.block_ids,
                params=p, seed_offset=s.seed_offset)
    run = plan.running
    if run:
        cols = msg.running
        cols.seq_ids.extend([r.seq_id for r in run])
        cols.num_computed_tokens.extend([r.num_computed_tokens for r in run])
        cols.num_scheduled_tokens.extend([r.num_scheduled_tokens for r in run])
        cols.num_new_blocks.extend([len(r.new_block_ids) for r in run])
        cols.new_block_ids.extend([b for r in run for b in r.new_block_ids])
    return msg


def step_plan_from_proto(msg: worker_pb2.StepInput) -> StepPlan:
    # Sequences of one request carry equal params: decode them once. Equal bytes mean equal
    # params, and SamplingParams is frozen, so sharing one object is safe.
    params_cache: dict[bytes, SamplingParams] = {}
    new = []
    for s in msg.new:
        key = s.params.SerializeToString()
        params = params_cache.get(key)
        if params is None:
            params = params_cache[key] = sampling_params_from_proto(s.params)
        new.append(NewSequence(s.seq_id, list(s.token_ids), s.num_prompt_tokens,
                               s.num_computed_tokens, s.num_scheduled_tokens,
                               list(s.block_ids), params, s.seed_offset))
    running = _running_from_proto(msg.running)
    return StepPlan(msg.step_id, new, running, list(msg.finished_ids), list(msg.preempted_ids))


def _running_from_proto(cols: worker_pb2.RunningSequences) -> list[RunningSequence]:
    seq_ids = list(cols.seq_ids)
    counts = list(cols.num_new_blocks)
    blocks = list(cols.new_block_ids)
    n = len(seq_ids)
    # Columns that disagree would silently misalign sequences and blocks: refuse them.
    if not (len(cols.num_computed_tokens) == len(cols.num_scheduled_tokens) == len(counts) == n
            and sum(counts) == len(blocks)):
        raise ValueError("StepInput.running: columns of different lengths")
    computed, scheduled = list(cols.num_computed_tokens), list(cols.num_scheduled_tokens)
    if not blocks:   # the common decode step: nobody crossed a block boundary
        return [RunningSequence(i, c, s, []) for i, c, s in zip(seq_ids, computed, scheduled)]
    out, start = [], 0
    for i, c, s, k in zip(seq_ids, computed, scheduled, counts):
        out.append(RunningSequence(i, c, s, blocks[start:start + k]))
        start += k
    return out


# --- StepOutput <-> StepOutput --------------------------------------------------------------

def step_output_to_proto(out: StepOutput) -> worker_pb2.StepOutput:
    msg = worker_pb2.StepOutput(step_id=out.step_id)
    sampled = out.sampled
    if sampled:
        msg.seq_ids.extend(sampled)
        tokens = list(sampled.values())
        msg.token_ids.extend([t.token_id for t in tokens])
        logprobs = msg.logprobs
        for row, t in enumerate(tokens):
            if t.logprob is None and t.top_logprobs is None:
                continue
            entry = logprobs[row]            # a map access creates the entry
            if t.logprob is not None:
                entry.logprob = t.logprob
            if t.top_logprobs is not None:
                top = entry.top_logprobs
                top.SetInParent()            # present even when empty: "asked for, none"
                if t.top_logprobs:
                    ids, lps = zip(*t.top_logprobs)
                    top.token_ids.extend(ids)
                    top.logprobs.extend(lps)
    for seq_id, positions in out.prompt_logprobs.items():
        pl = msg.prompt_logprobs[seq_id]
        counts, top_ids, top_lps = [], [], []
        for _, top in positions:
            counts.append(len(top))
            for token_id, lp in top:
                top_ids.append(token_id)
                top_lps.append(lp)
        pl.logprobs.extend([lp for lp, _ in positions])
        pl.top_counts.extend(counts)
        pl.top_token_ids.extend(top_ids)
        pl.top_logprobs.extend(top_lps)
    return msg


def step_output_from_proto(msg: worker_pb2.StepOutput) -> StepOutput:
    seq_ids = list(msg.seq_ids)
    if len(msg.token_ids) != len(seq_ids):
        raise ValueError("StepOutput: seq_ids and token_ids of different lengths")
    sampled = {i: SampledToken(t) for i, t in zip(seq_ids, msg.token_ids)}
    for row, e in msg.logprobs.items():
        if not 0 <= row < len(seq_ids):
            raise ValueError(f"StepOutput.logprobs: row {row} out of range")
        t = sampled[seq_ids[row]]
        if e.HasField("logprob"):
            t.logprob = e.logprob
        if e.HasField("top_logprobs"):
            t.top_logprobs = list(zip(e.top_logprobs.token_ids, e.top_logprobs.logprobs))
    prompt_logprobs = {}
    for seq_id, pl in msg.prompt_logprobs.items():
        top_ids, top_lps = list(pl.top_token_ids), list(pl.top_logprobs)
        positions, start = [], 0
        for lp, count in zip(pl.logprobs, pl.top_counts):
            end = start + count
            positions.append((lp, list(zip(top_ids[start:end], top_lps[start:end]))))
            start = end
        prompt_logprobs[seq_id] = positions
    return StepOutput(msg.step_id, sampled, prompt_logprobs)
