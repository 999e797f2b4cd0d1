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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from common.proto.tessera.v1 import generate_pb2, worker_pb2
from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputs
from common.step import NewSequence, RunningSequence, SampledToken, StepOutput, StepPlan

__all__ = [
    "sampling_params_to_proto", "sampling_params_from_proto",
    "step_plan_to_proto", "step_plan_from_proto",
    "step_output_to_proto", "step_output_from_proto",
    "Choice", "GenerateResult", "StreamChunk", "ModelInfo", "GenerateCall",
    "generate_request_to_proto", "generate_request_from_proto",
    "generate_result_to_proto", "generate_result_from_proto",
    "stream_chunk_to_proto", "stream_chunk_from_proto",
    "prompt_to_proto", "prompt_from_proto", "model_info_to_proto", "model_info_from_proto",
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
            kwargs[name] = (structured_outputs_to_proto(value) if name == "structured_outputs"
                            else value)
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
        elif name == "structured_outputs":
            value = structured_outputs_from_proto(value)
        kwargs[name] = value
    return SamplingParams(**kwargs)


def structured_outputs_to_proto(spec: StructuredOutputs) -> generate_pb2.StructuredOutputs:
    kind, value = spec.key
    if kind == "choice":
        return generate_pb2.StructuredOutputs(choice=generate_pb2.StringList(values=value))
    return generate_pb2.StructuredOutputs(**{kind: value})


def structured_outputs_from_proto(msg: generate_pb2.StructuredOutputs) -> StructuredOutputs:
    """Raises ValueError for an empty (kind-less) message or an invalid spec."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set exactly one of json, json_object, "
                         "regex, choice, grammar")
    if kind == "choice":
        return StructuredOutputs(choice=tuple(msg.choice.values))
    return StructuredOutputs(**{kind: getattr(msg, kind)})


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
        cols.num_new_tokens.extend([len(r.new_token_ids) for r in run])
        cols.new_token_ids.extend([t for r in run for t in r.new_token_ids])
        if any(r.draft_token_ids for r in run):
            cols.num_draft_tokens.extend([len(r.draft_token_ids) for r in run])
            cols.draft_token_ids.extend([t for r in run for t in r.draft_token_ids])
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
    n = len(seq_ids)
    computed, scheduled = list(cols.num_computed_tokens), list(cols.num_scheduled_tokens)
    blocks = _split_column(list(cols.num_new_blocks), list(cols.new_block_ids), n, "blocks")
    tokens = _split_column(list(cols.num_new_tokens), list(cols.new_token_ids), n, "tokens")
    # Columns that disagree would silently misalign sequences and blocks: refuse them.
    if not len(computed) == len(scheduled) == n:
        raise ValueError("StepInput.running: columns of different lengths")
    rows = [RunningSequence(i, c, s, b, t)
            for i, c, s, b, t in zip(seq_ids, computed, scheduled, blocks, tokens)]
    if cols.num_draft_tokens or cols.draft_token_ids:
        drafts = _ragged_checked(list(cols.num_draft_tokens), list(cols.draft_token_ids), n,
                                 "draft tokens")
        for row, d in zip(rows, drafts):
            row.draft_token_ids = d
    return rows


def _ragged_checked(counts: list[int], flat: list[int], n: int, what: str) -> list[list[int]]:
    if len(counts) != n or sum(counts) != len(flat) or any(k < 0 for k in counts):
        raise ValueError(f"StepInput.running: the {what} columns do not match the rows")
    return _ragged(counts, flat)


def _split_column(counts: list[int], flat: list[int], n: int, what: str) -> list[list[int]]:
    """Row i's entries of a ragged column: the next counts[i] entries of flat."""
    if len(counts) != n or sum(counts) != len(flat) or any(k < 0 for k in counts):
        raise ValueError(f"StepInput.running: the new {what} columns do not match the rows")
    if not flat:
        return [[] for _ in range(n)]
    if len(flat) == n:   # the common decode step: one each
        return [[x] for x in flat] if all(k == 1 for k in counts) else _ragged(counts, flat)
    return _ragged(counts, flat)


def _ragged(counts: list[int], flat: list[int]) -> list[list[int]]:
    out, start = [], 0
    for k in counts:
        out.append(flat[start:start + k])
        start += k
    return out


# --- StepOutput <-> StepOutput --------------------------------------------------------------

def step_output_to_proto(out: StepOutput) -> worker_pb2.StepOutput:
    msg = worker_pb2.StepOutput(step_id=out.step_id)
    sampled = out.sampled
    if sampled:
        msg.seq_ids.extend(sampled)
        tokens = list(sampled.values())
        if out.extra_sampled:   # speculative decoding: one more row per extra token
            for seq_id, extra in out.extra_sampled.items():
                msg.seq_ids.extend([seq_id] * len(extra))
                tokens += extra
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
    if out.deferred:
        msg.deferred.extend(out.deferred)
    return msg


def step_output_from_proto(msg: worker_pb2.StepOutput) -> StepOutput:
    seq_ids = list(msg.seq_ids)
    if len(msg.token_ids) != len(seq_ids):
        raise ValueError("StepOutput: seq_ids and token_ids of different lengths")
    rows = [SampledToken(t) for t in msg.token_ids]
    sampled = dict(zip(seq_ids, rows))
    extra: dict[str, list[SampledToken]] = {}
    if len(sampled) != len(seq_ids):   # speculative decoding: a sequence's later rows
        sampled = {}
        for seq_id, t in zip(seq_ids, rows):
            if seq_id in sampled:
                extra.setdefault(seq_id, []).append(t)
            else:
                sampled[seq_id] = t
    for row, e in msg.logprobs.items():
        if not 0 <= row < len(seq_ids):
            raise ValueError(f"StepOutput.logprobs: row {row} out of range")
        t = rows[row]
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
    return StepOutput(msg.step_id, sampled, prompt_logprobs, extra, list(msg.deferred))


# --- Public API (tessera.v1.Generate) -------------------------------------------------------
# The gateway's servicer and tessera.client both speak these dataclasses; the messages stay
# here. A prompt is text, token ids, or chat messages ({"role", "content"} mappings).
Prompt = str | list[int] | list[dict[str, str]]
# Per generated token: (token id, its logprob, top-N [(id, logprob)]), as CompletionOutput.
TokenLogprobs = list[tuple[int, float, list[tuple[int, float]]]]

_FINISH_TO_PROTO = {None: generate_pb2.FINISH_REASON_UNSPECIFIED,
                    "stop": generate_pb2.FINISH_REASON_STOP,
                    "length": generate_pb2.FINISH_REASON_LENGTH,
                    "abort": generate_pb2.FINISH_REASON_ABORT,
                    "error": generate_pb2.FINISH_REASON_ERROR}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


@dataclass(frozen=True)
class Choice:
    """One of the n choices: in full in a GenerateResult, or what it added in a StreamChunk."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None    # "stop", "length", "abort", "error"; None: running


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    request_id: str
    index: int                           # event index: strictly increasing, the resume cursor
    choices: list[Choice]
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, on the final chunk


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
    created: int


@dataclass(frozen=True)
class GenerateCall:
    """A GenerateRequest as the gateway acts on it (params already validated)."""
    model: str
    prompt: Prompt | None                # None only on a resume
    params: SamplingParams
    request_id: str = ""
    idempotency_key: str = ""
    last_event_index: int | None = None
    priority: int = 0
    disconnect: str = "cancel"           # or "continue" (redis_schema's DISCONNECT_*)


def prompt_to_proto(msg: generate_pb2.GenerateRequest | generate_pb2.TokenizeRequest,
                    prompt: Prompt | Sequence[Mapping[str, str]]) -> None:
    """Set the prompt oneof of ``msg`` (GenerateRequest or TokenizeRequest)."""
    if isinstance(prompt, str):
        msg.text = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        msg.chat.messages.extend(generate_pb2.ChatMessage(role=m["role"], content=m["content"])
                                 for m in prompt)
    elif hasattr(msg, "token_ids"):
        msg.token_ids.ids.extend(prompt)
    else:
        raise ValueError("prompt must be text or chat messages")


def prompt_from_proto(msg: generate_pb2.GenerateRequest | generate_pb2.TokenizeRequest
                      ) -> Prompt | None:
    which = msg.WhichOneof("prompt" if isinstance(msg, generate_pb2.GenerateRequest) else "input")
    if which == "text":
        return msg.text
    if which == "token_ids":
        return list(msg.token_ids.ids)
    if which == "chat":
        return [{"role": m.role, "content": m.content} for m in msg.chat.messages]
    return None


def generate_request_to_proto(call: GenerateCall) -> generate_pb2.GenerateRequest:
    msg = generate_pb2.GenerateRequest(
        model=call.model, params=sampling_params_to_proto(call.params),
        request_id=call.request_id, idempotency_key=call.idempotency_key,
        priority=call.priority,
        disconnect_policy=(generate_pb2.DISCONNECT_POLICY_CONTINUE
                           if call.disconnect == "continue" else generate_pb2.DISCONNECT_POLICY_CANCEL))
    if call.prompt is not None:
        prompt_to_proto(msg, call.prompt)
    if call.last_event_index is not None:
        msg.last_event_index = call.last_event_index
    return msg


def generate_request_from_proto(msg: generate_pb2.GenerateRequest) -> GenerateCall:
    """Raises ValueError naming the field for invalid sampling params."""
    return GenerateCall(
        model=msg.model, prompt=prompt_from_proto(msg),
        params=sampling_params_from_proto(msg.params), request_id=msg.request_id,
        idempotency_key=msg.idempotency_key,
        last_event_index=msg.last_event_index if msg.HasField("last_event_index") else None,
        priority=msg.priority,
        disconnect=("continue" if msg.disconnect_policy == generate_pb2.DISCONNECT_POLICY_CONTINUE
                    else "cancel"))


def _fill_choice(msg: generate_pb2.Choice | generate_pb2.ChoiceDelta, c: Choice) -> None:
    msg.index, msg.text = c.index, c.text
    msg.token_ids.extend(c.token_ids)
    msg.finish_reason = _FINISH_TO_PROTO.get(c.finish_reason, generate_pb2.FINISH_REASON_ERROR)
    for token_id, lp, top in c.logprobs or ():
        msg.logprobs.add(token_id=token_id, logprob=lp, top_logprobs=[
            generate_pb2.TopLogprob(token_id=i, logprob=v) for i, v in top])


def _choice_from(msg: generate_pb2.Choice | generate_pb2.ChoiceDelta) -> Choice:
    # A message cannot tell "logprobs not asked for" from "none in this delta"; None for both.
    logprobs = [(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top_logprobs])
                for e in msg.logprobs] or None
    return Choice(msg.index, msg.text, list(msg.token_ids), logprobs,
                  _FINISH_FROM_PROTO.get(msg.finish_reason, "error"))


def generate_result_to_proto(r: GenerateResult) -> generate_pb2.GenerateResponse:
    msg = generate_pb2.GenerateResponse(request_id=r.request_id, usage=generate_pb2.Usage(
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens))
    for c in r.choices:
        _fill_choice(msg.choices.add(), c)
    return msg


def generate_result_from_proto(msg: generate_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(msg.request_id, [_choice_from(c) for c in msg.choices],
                          msg.usage.prompt_tokens, msg.usage.completion_tokens)


def stream_chunk_to_proto(chunk: StreamChunk) -> generate_pb2.GenerateStreamResponse:
    msg = generate_pb2.GenerateStreamResponse(request_id=chunk.request_id, index=chunk.index)
    for c in chunk.choices:
        _fill_choice(msg.choices.add(), c)
    if chunk.usage is not None:
        msg.usage.prompt_tokens, msg.usage.completion_tokens = chunk.usage
    return msg


def stream_chunk_from_proto(msg: generate_pb2.GenerateStreamResponse) -> StreamChunk:
    usage = ((msg.usage.prompt_tokens, msg.usage.completion_tokens)
             if msg.HasField("usage") else None)
    return StreamChunk(msg.request_id, msg.index, [_choice_from(c) for c in msg.choices], usage)


def model_info_to_proto(m: ModelInfo) -> generate_pb2.ModelInfo:
    return generate_pb2.ModelInfo(id=m.id, max_model_len=m.max_model_len, created=m.created)


def model_info_from_proto(msg: generate_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.id, msg.max_model_len, msg.created)
