"""The batched sampler: each parameter's effect, seeded determinism, raw logprobs, and the draw's
statistics. Supports are checked exactly by sampling many seeded rows in one batch."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling_params import SamplingParams
from worker.sampler import (Sampler, SamplingRow, apply_penalties, compute_prompt_logprobs,
                            fast_argmax, fast_topk)

V = 5000
EOS = 7


def row(prompt=(1, 2, 3), output=(), offset=0, eos=(EOS,), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), offset, eos)


def known_logits(probs: dict[int, float], vocab: int = V) -> torch.Tensor:
    """[vocab] logits whose softmax puts probs[t] on t and spreads the rest evenly on the others."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest, dtype=torch.float64)
    for t, q in probs.items():
        p[t] = q
    return p.log().float()


def support(logits_row: torch.Tensor, n: int = 2000, **params) -> set[int]:
    """Distinct tokens of n seeded draws (one batch, seeds 0..n-1) from one row of logits."""
    rows = [row(seed=s, **params) for s in range(n)]
    return set(Sampler(seed=0)(logits_row.expand(n, -1).contiguous(), rows).token_ids)


PEAKED = {10: 0.5, 20: 0.3, 30: 0.15, 40: 0.04}   # the other 4996 tokens share 0.01


def test_temperature_zero_is_argmax_and_top_k_one_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, V) * 3
    want = logits.argmax(-1).tolist()
    s = Sampler(seed=1)
    assert s(logits, [row(temperature=0.0) for _ in range(64)]).token_ids == want
    assert s(logits, [row(temperature=1.3, top_k=1) for _ in range(64)]).token_ids == want
    mixed = [row(temperature=0.0) if i % 2 else row(temperature=0.7, top_k=1) for i in range(64)]
    assert s(logits, mixed).token_ids == want


@pytest.mark.parametrize("vocab", [5, 128, 300, 32000, 32001])
def test_fast_argmax_matches_torch_including_ties_and_tail(vocab):
    torch.manual_seed(vocab)
    x = torch.randint(0, 4, (37, vocab)).float()   # many ties: the first index must win
    x[3, -1] = 10.0                                 # the maximum in the ragged tail
    assert torch.equal(fast_argmax(x), x.argmax(-1))


@pytest.mark.parametrize("top_p, want", [(0.75, {10, 20}), (0.85, {10, 20, 30}),
                                         (0.97, {10, 20, 30, 40})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, want):
    assert support(known_logits(PEAKED), temperature=1.0, top_p=top_p) == want


def test_top_p_is_measured_after_top_k():
    # Within the top 3 the mass is renormalised: 0.5/0.95, 0.3/0.95, 0.15/0.95 -> 0.84 covers two.
    assert support(known_logits(PEAKED), temperature=1.0, top_k=3, top_p=0.8) == {10, 20}
    assert support(known_logits(PEAKED), temperature=1.0, top_k=3, top_p=0.86) == {10, 20, 30}


def nucleus(logits_row: torch.Tensor, top_p: float) -> set[int]:
    """The reference: sort, keep while the mass strictly ahead is below top_p."""
    probs, ids = logits_row.softmax(-1).sort(descending=True)
    return set(ids[(probs.cumsum(-1) - probs) < top_p].tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9])
def test_top_p_by_rejection_matches_sorted_nucleus(top_p):
    # Rows without top_k never sort: they draw and reject (module note). Same support and the same
    # renormalised frequencies as the sort-based definition; top_k = V - 1 takes the sorting path.
    logits = torch.randn(60, generator=torch.Generator().manual_seed(6)) * 1.5
    want = nucleus(logits, top_p)
    probs = logits.softmax(-1)
    for extra in ({}, {"top_k": 59}):
        rows = [row(seed=s, temperature=1.0, top_p=top_p, **extra) for s in range(4000)]
        tokens = Sampler()(logits.expand(4000, -1).contiguous(), rows).token_ids
        assert set(tokens) == want, extra
        mass = sum(probs[t].item() for t in want)
        for t in want:
            assert abs(tokens.count(t) / 4000 - probs[t].item() / mass) < 0.03


@pytest.mark.parametrize("k, vocab", [(1, 300), (50, 32000), (7, 32001), (100, 1000)])
def test_fast_topk_matches_torch(k, vocab):
    x = torch.randn(9, vocab, generator=torch.Generator().manual_seed(k))
    vals, ids = fast_topk(x, k)
    want_v, _ = x.topk(k, -1)
    assert torch.equal(vals, want_v) and torch.equal(x.gather(1, ids), want_v)


def test_top_k_support():
    assert support(known_logits(PEAKED), temperature=1.0, top_k=2) == {10, 20}


@pytest.mark.parametrize("min_p, want", [(0.25, {10, 20, 30}), (0.5, {10, 20}), (0.07, {10, 20, 30, 40})])
def test_min_p_drops_tokens_below_fraction_of_max(min_p, want):
    assert support(known_logits(PEAKED), temperature=1.0, min_p=min_p) == want
    assert support(known_logits(PEAKED), temperature=1.0, min_p=min_p, top_k=10) == want


def test_repetition_penalty_changes_exactly_seen_tokens():
    logits = torch.linspace(-3, 3, 50).repeat(2, 1)
    before = logits.clone()
    rows = [row(prompt=[45, 2, 2], output=[10, 45], repetition_penalty=2.0), row()]
    apply_penalties(logits, rows)
    seen = {45, 2, 10}
    for t in range(50):
        b = before[0, t].item()
        want = (b / 2.0 if b > 0 else b * 2.0) if t in seen else b
        assert logits[0, t].item() == pytest.approx(want), t
    assert torch.equal(logits[1], before[1])


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 20)
    apply_penalties(logits, [row(prompt=[1, 5], output=[3, 3, 3, 4],
                                 presence_penalty=0.5, frequency_penalty=0.25)])
    want = torch.zeros(20)
    want[3] = -(0.5 + 0.25 * 3)
    want[4] = -(0.5 + 0.25 * 1)
    assert torch.allclose(logits[0], want)   # prompt tokens 1, 5 untouched


def test_penalties_apply_to_greedy_rows():
    logits = torch.zeros(1, 300)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    s = Sampler()
    assert s(logits, [row(output=[5], temperature=0.0)]).token_ids == [5]
    assert s(logits, [row(output=[5], temperature=0.0, repetition_penalty=1.5)]).token_ids == [6]
    assert s(logits, [row(output=[5], temperature=0.0, frequency_penalty=1.0)]).token_ids == [6]


def test_logit_bias_bans_and_forces():
    logits = known_logits(PEAKED)
    assert 10 not in support(logits, temperature=1.0, logit_bias={10: float("-inf")})
    assert support(logits, temperature=1.0, logit_bias={4321: 100.0}) == {4321}
    assert support(logits, n=50, temperature=0.0, logit_bias={10: -100.0}) == {20}


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 300)
    logits[0, EOS], logits[0, 9], logits[0, 11] = 30.0, 20.0, 10.0
    s = Sampler()
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=(9,))
    assert s(logits, [row(output=[1, 2], **params)]).token_ids == [11]
    assert s(logits, [row(output=[1, 2, 3], **params)]).token_ids == [EOS]
    # ignore_eos: EOS is no stop token at all, so min_tokens does not ban it; stop ids still are.
    assert s(logits, [row(output=[1], ignore_eos=True, **params)]).token_ids == [EOS]
    sampled = support(logits[0], n=200, temperature=1.0, min_tokens=1, stop_token_ids=(9,))
    assert EOS not in sampled and 9 not in sampled


def test_seeded_row_is_independent_of_batch_and_position():
    torch.manual_seed(2)
    target = torch.randn(V)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        out = list(range(step))   # token index = len(output_token_ids)
        me = row(output=out, seed=1234, temperature=0.9, top_p=0.95, top_k=[0, 40][step % 2])
        alone = Sampler(seed=step)(target[None], [me]).token_ids[0]
        others = [row(output=[5] * i, temperature=float(torch.rand(1, generator=gen)) + 0.2,
                      top_k=[0, 0, 20][i % 3], top_p=[1.0, 0.8][i % 2], min_p=[0.0, 0.05][i % 2],
                      seed=[None, 99 + i][i % 2], repetition_penalty=[1.0, 1.2][i % 3 == 1])
                  for i in range(32)]
        pos = (7 * step) % 33
        batch = others[:pos] + [me] + others[pos:]
        logits = torch.randn(33, V, generator=gen)
        logits[pos] = target
        assert Sampler(seed=100 + step)(logits, batch).token_ids[pos] == alone


def test_seed_offset_gives_a_different_stream():
    logits = torch.zeros(1, V)   # uniform: two streams agree only by chance, 1 in 5000 per step
    s = Sampler()
    a = [s(logits, [row(output=[0] * i, seed=5, offset=0)]).token_ids[0] for i in range(20)]
    b = [s(logits, [row(output=[0] * i, seed=5, offset=1)]).token_ids[0] for i in range(20)]
    again = [s(logits, [row(output=[0] * i, seed=5, offset=0)]).token_ids[0] for i in range(20)]
    assert a == again and a != b and len(set(a)) > 10


def test_logprobs_are_raw_and_top_n_sorted():
    torch.manual_seed(4)
    logits = torch.randn(4, 300)
    original = logits.clone()
    rows = [row(logprobs=3, temperature=0.5, top_k=5, repetition_penalty=1.3, output=[1, 2]),
            row(),
            row(logprobs=0, temperature=0.0, logit_bias={17: 50.0}),
            row(logprobs=5, seed=1)]
    out = Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, original)   # the caller's tensor is not edited
    raw = original.log_softmax(-1)
    assert out.token_ids[2] == 17
    for i in (0, 2, 3):
        assert out.logprobs[i] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-5)
        n = rows[i].params.logprobs
        top_v, top_i = raw[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in out.top_logprobs[i]] == top_i.tolist()
        assert [v for _, v in out.top_logprobs[i]] == pytest.approx(top_v.tolist(), abs=1e-5)
        vals = [v for _, v in out.top_logprobs[i]]
        assert vals == sorted(vals, reverse=True)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert Sampler()(logits, [row()] * 4).logprobs is None


def test_compute_prompt_logprobs_matches_direct_computation():
    torch.manual_seed(5)
    logits = torch.randn(6, 100)
    nxt = [3, 99, 0, 50, 50, 7]
    got = compute_prompt_logprobs(logits, nxt, num_top=4)
    for pos, (lp, top) in enumerate(got):
        direct = logits[pos] - torch.logsumexp(logits[pos], 0)
        assert lp == pytest.approx(direct[nxt[pos]].item(), abs=1e-5)
        order = sorted(range(100), key=lambda t: -direct[t].item())[:4]
        assert [t for t, _ in top] == order
        assert [v for _, v in top] == pytest.approx([direct[t].item() for t in order], abs=1e-5)
    assert all(top == [] for _, top in compute_prompt_logprobs(logits, nxt, num_top=0))


@pytest.mark.parametrize("extra", [{}, {"top_k": 3}, {"top_p": 0.999999}])
def test_frequencies_match_probabilities(extra):
    probs = [0.6, 0.3, 0.1]
    vocab = 400 if extra else 3   # the top_k / top_p paths work on candidates of a larger vocabulary
    logits = torch.full((vocab,), -math.inf)
    logits[:3] = torch.tensor(probs).log()
    rows = [row(seed=s, temperature=1.0, **extra) for s in range(3000)]
    tokens = Sampler()(logits.expand(3000, -1).contiguous(), rows).token_ids
    for t, p in enumerate(probs):
        assert abs(tokens.count(t) / 3000 - p) < 0.03, (t, tokens.count(t))
    assert set(tokens) == {0, 1, 2}


def test_temperature_flattens_and_sharpens():
    logits = torch.tensor([[2.0, 0.0, -math.inf]]).expand(3000, -1).contiguous()
    def share_of_top(t: float) -> float:
        rows = [row(seed=s, temperature=t) for s in range(3000)]
        return Sampler()(logits, rows).token_ids.count(0) / 3000
    p1 = 1 / (1 + math.exp(-2.0))
    assert abs(share_of_top(1.0) - p1) < 0.03
    assert abs(share_of_top(0.5) - 1 / (1 + math.exp(-4.0))) < 0.03
    assert abs(share_of_top(4.0) - 1 / (1 + math.exp(-0.5))) < 0.03


def test_bfloat16_logits_and_row_count_check():
    logits = torch.randn(3, 300).bfloat16()
    out = Sampler()(logits, [row(temperature=0.0, logprobs=1)] * 3)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    with pytest.raises(ValueError):
        Sampler()(logits, [row()] * 2)


def test_callers_logits_restored_after_overlapping_edits():
    torch.manual_seed(7)
    logits = torch.randn(2, 300)
    original = logits.clone()
    # token 9: biased, then banned (stop id below min_tokens), then repetition-penalised
    rows = [row(prompt=[9, 9, 4], output=[9], logit_bias={9: 3.0, 4: -1.0}, min_tokens=5,
                stop_token_ids=(9,), repetition_penalty=1.3, frequency_penalty=0.5, temperature=0.0),
            row(output=[1, 1], presence_penalty=1.0)]
    out = Sampler()(logits, rows)
    assert torch.equal(logits, original)
    edited = apply_penalties(original.clone(), rows)
    assert out.token_ids[0] == edited[0].argmax().item() and edited[0, 9] == float("-inf")
