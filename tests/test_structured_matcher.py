"""The worker's grammar state (worker/structured.py) is a function of the sequence's tokens:
syncing to a token list (forwards, backwards, on a fresh matcher) gives the same mask as
accepting the tokens one by one; rows of one sequence in one sampler call each see their own
tokens' mask; a row whose tokens break the grammar may only end. Plus the gateway's checks
of specs (common/grammar.py, common/ebnf_check.py). Real xgrammar, the tiny model's
tokenizer, no processes."""

from __future__ import annotations

import json

import pytest
import torch

from common.grammar import GrammarCompiler, GrammarError
from common.model_config import ModelConfig
from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputs
from common.tokenizer import Tokenizer
from worker.sampler import Sampler, SamplingRow
from worker.structured import GrammarBackend

CHOICES = ["alpha", "alps", "beta"]


@pytest.fixture(scope="module")
def model(tiny_model):
    d = tiny_model("llama")
    return str(d), ModelConfig.from_dir(d), Tokenizer.from_dir(d)


def _allowed(g, vocab: int) -> set[int]:
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    g.fill_bitmask(bitmask, 0)
    return {i for i in range(vocab) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}


def test_sync_replays_and_rolls_back_to_exactly_the_tokens(model) -> None:
    path, config, tok = model
    backend = GrammarBackend(path, config.vocab_size, config.eos_token_ids)
    spec = StructuredOutputs(choice=tuple(CHOICES))
    ids = tok.encode("alps", add_special_tokens=False)
    assert len(ids) >= 2
    step = backend.matcher(spec)
    masks = [_allowed(step, config.vocab_size)]
    for t in ids:
        assert step.accept(t)
        masks.append(_allowed(step, config.vocab_size))
    assert masks[-1] == set(config.eos_token_ids), "complete: only EOS"
    fresh = backend.matcher(spec)   # a new worker: replays the tokens
    assert fresh.sync(ids) and _allowed(fresh, config.vocab_size) == masks[-1]
    for k in range(len(ids), -1, -1):   # and backwards, one prefix at a time
        assert fresh.sync(ids[:k]) and fresh.tokens == ids[:k]
        assert _allowed(fresh, config.vocab_size) == masks[k]
    assert fresh.count_valid(ids) == len(ids) and fresh.tokens == []
    bad = tok.encode("gamma", add_special_tokens=False)
    assert fresh.count_valid(ids[:1] + bad) == 1 and not fresh.accept(bad[0])
    assert not fresh.sync(bad) and fresh.tokens == []
    fresh.accept(ids[0])
    fresh.rollback(1)
    assert fresh.tokens == [] and _allowed(fresh, config.vocab_size) == masks[0]
    assert not fresh.is_terminated()


def test_rows_of_one_sequence_get_their_own_masks_before_the_bias(model) -> None:
    path, config, tok = model
    backend = GrammarBackend(path, config.vocab_size, config.eos_token_ids)
    g = backend.matcher(StructuredOutputs(choice=tuple(CHOICES)))
    ids = tok.encode("beta", add_special_tokens=False)
    # A logit_bias of +100 on a token the grammar never allows cannot bring it back.
    forbidden = tok.encode("zzz", add_special_tokens=False)[0]
    params = SamplingParams(temperature=0.0, logit_bias={forbidden: 100.0})
    eos = tuple(config.eos_token_ids)
    rows = [SamplingRow(params, [1], ids[:k], eos_token_ids=eos, grammar=g)
            for k in range(len(ids) + 1)]
    rows.append(SamplingRow(params, [1], tok.encode("gamma", add_special_tokens=False),
                            eos_token_ids=eos, grammar=g))   # broken tokens: may only end
    logits = torch.randn(len(rows), config.vocab_size)
    for k, t in enumerate(ids):
        logits[k, t] += 20.0    # allowed, and the favourite among the allowed
    out = Sampler(seed=0)(logits, rows).token_ids
    assert out[:len(ids)] == ids, "each row continues its own prefix"
    assert out[len(ids)] in eos and out[-1] in eos
    assert forbidden not in out


def test_gateway_checks_name_the_problem(model) -> None:
    path, config, tok = model
    gc = GrammarCompiler(tok, config.vocab_size, config.eos_token_ids)
    ok = StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert gc.compile(ok) is gc.compile(StructuredOutputs(json=json.dumps(
        {"properties": {"a": {"type": "integer"}}, "type": "object"})))   # one cache entry
    for spec, words in [
            (StructuredOutputs(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
            (StructuredOutputs(json={"properties": {"x": {"not": {}}}}), "/properties/x"),
            (StructuredOutputs(json={"allOf": [{"type": "integer"}, {"maximum": 3}]}), "allOf"),
            (StructuredOutputs(regex="[a-"), "Regex"),
            (StructuredOutputs(grammar='root ::= "(" root ")"'), "never end"),
            (StructuredOutputs(grammar='root ::= x\nx ::= "a" x | "b" x'), "never end")]:
        with pytest.raises(GrammarError, match=words) as e:
            gc.compile(spec)
        assert e.value.field == f"structured_outputs.{spec.kind}"
    # Grammars that can end compile, with or without recursion.
    gc.compile(StructuredOutputs(grammar='root ::= "(" root ")" | "x"'))
    gc.compile(StructuredOutputs(grammar='root ::= item+\nitem ::= [a-z] | "[" item* "]"'))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})


def test_offline_llm_takes_structured_outputs(model) -> None:
    import re

    from tessera.llm import LLM

    path, _, _ = model
    with LLM(path) as llm:
        outs = llm.generate([f"Id {i}:" for i in range(4)], [
            SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True,
                           structured_outputs=StructuredOutputs(regex=r"[A-Z]{2}[0-9]{1,3}"))
            for i in range(4)], use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert re.fullmatch(r"[A-Z]{2}[0-9]{1,3}", c.text) and c.finish_reason == "stop", c


def test_json_strings_admit_no_control_characters_or_special_tokens(model) -> None:
    """Two xgrammar pitfalls a random model found: a string with maxLength admitted raw
    control characters (invalid JSON), and special tokens (which the detokenizer drops)
    counted as string text."""
    path, config, tok = model
    backend = GrammarBackend(path, config.vocab_size, config.eos_token_ids)
    g = backend.matcher(StructuredOutputs(json={"type": "string", "maxLength": 5}))
    assert g.accept(tok.token_to_id('"'))
    allowed = _allowed(g, config.vocab_size)
    control = tok.token_to_id("đ")      # byte 0x11 in the byte-level alphabet
    letter = tok.token_to_id("a")
    specials = {i for i in range(config.vocab_size)
                if tok.convert_ids_to_tokens(i) in tok.special_tokens_map.values()}
    assert letter in allowed and control is not None and control not in allowed
    assert specials and not specials & allowed


def test_prewarm_builds_the_tables_before_any_structured_sequence(model, caplog) -> None:
    path, config, _ = model
    backend = GrammarBackend(path, config.vocab_size, config.eos_token_ids)
    assert backend._compiler is None
    backend.prewarm().result(timeout=120)
    assert backend._compiler is not None and backend._compiler._compiler is not None
    # The first matcher then only compiles its spec: it constrains as a lazy backend's would.
    g = backend.matcher(StructuredOutputs(choice=tuple(CHOICES)))
    assert _allowed(g, config.vocab_size)
    # Without a tokenizer prewarm only logs: the sequence that asks meets the error alone.
    bare = GrammarBackend(None, config.vocab_size, config.eos_token_ids)
    with caplog.at_level("WARNING", logger="worker.structured"):
        assert bare.prewarm().result(timeout=10) is None
    assert "not available" in caplog.text
    g = bare.matcher(StructuredOutputs(choice=tuple(CHOICES)))
    assert not g.fill_bitmask(torch.zeros((1, 1), dtype=torch.int32), 0) and g.broken


def test_the_gateway_prepares_its_grammar_tables_off_the_event_loop(model) -> None:
    import asyncio

    from common.redis_client import connect
    from gateway.service import _prepare_grammars
    from gateway.state import GatewayState

    path, _, _ = model

    async def run() -> GatewayState:
        redis = connect("redis://127.0.0.1:1")   # never used: nothing here talks to Redis
        state = GatewayState.load(path, "m", redis)
        assert state.grammars._compiler is None
        await _prepare_grammars(state)
        await redis.aclose()
        return state

    assert asyncio.run(run()).grammars._compiler is not None
