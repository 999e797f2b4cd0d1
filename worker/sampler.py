"""The batched sampler: next-token logits [S, V] plus per-row sampling parameters -> one token each.

Order of processing is vLLM's: logit_bias and min_tokens, repetition penalty, presence and
frequency penalties, temperature, top_k, top_p, min_p, then the draw. Greedy rows (temperature 0)
take the argmax of the penalised logits. Returned logprobs come from the RAW distribution
(log_softmax of the logits as given), as vLLM v1 does by default.

Every processor runs on all rows at once, and is skipped when no row uses it: the all-greedy and
plain-temperature batches, the common ones, pay one or two passes over [S, V].

NOTE on the draw. Each sampled row uses ONE uniform number u and inverse-CDF sampling over its
(truncated) weights: token = first i with cumsum(w)[i] > u * sum(w). That is the same distribution
as the exponential race argmax(p / Exp(1)), but the race needs V random numbers per row and
`exponential_` over [256, 32000] costs ~230 ms on our 2-core CPUs, against ~1 ms for a cumsum over
the few candidates left by top_k. A seeded row's u is a counter-based hash of
(seed, seed_offset, token index), so its tokens do not depend on the rest of the batch, its row
position, or a preemption/recompute in between; unseeded rows draw their u from the sampler's
generator in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# Rows with top_p but no top_k first look for their nucleus among this many best tokens; only
# rows whose nucleus is wider (flat distributions) pay a full sort of the vocabulary.
_TOP_P_PROBE = 1024
_ARGMAX_CHUNK = 128


@dataclass
class SamplingRow:
    """One sequence of the batch: what the sampler needs to know about it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]      # generated so far: penalties, min_tokens, token index
    seed_offset: int = 0                 # child index: the n sequences of one seeded request differ
    eos_token_ids: tuple[int, ...] = ()  # from the model config; banned below min_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]                                 # one per row
    logprobs: list[float | None] | None                  # sampled token's raw logprob; None: no row asked
    top_logprobs: list[list[tuple[int, float]] | None]   # per row: top-N (id, logprob), descending


def seeded_uniform(seed: int, seed_offset: int, token_index: int) -> float:
    """A uniform in [0, 1) that depends only on its key (splitmix64 chain; stable across torch
    versions and processes, unlike a generator whose state would depend on earlier draws)."""
    h = 0
    for part in (seed, seed_offset, token_index):
        h = ((h ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return (h >> 11) * 2.0 ** -53


def _banned_below_min_tokens(row: SamplingRow) -> tuple[int, ...]:
    """Stop ids a row may not produce yet. With ignore_eos, EOS is no stop token at all (vLLM's
    all_stop_token_ids leaves it out), so min_tokens has no reason to ban it."""
    p = row.params
    if p.min_tokens <= len(row.output_token_ids):
        return ()
    return p.stop_token_ids + (() if p.ignore_eos else row.eos_token_ids)


def _needs_penalties(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty
                or p.frequency_penalty or _banned_below_min_tokens(row))


def _pairs(rows: list[SamplingRow], which: list[int], prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) for every token of the chosen rows (output, plus prompt if asked)."""
    toks, counts = [], []
    for i in which:
        t = torch.as_tensor(rows[i].output_token_ids, dtype=torch.long)
        if prompt:
            t = torch.cat([torch.as_tensor(rows[i].prompt_token_ids, dtype=torch.long), t])
        toks.append(t)
        counts.append(t.numel())
    r = torch.tensor(which, dtype=torch.long).repeat_interleave(torch.tensor(counts))
    return r, torch.cat(toks)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply logit_bias, min_tokens bans, repetition, presence and frequency penalties to a float
    [S, V] tensor IN PLACE (and return it). Costs O(tokens touched), never a pass over [S, V]."""
    S, V = logits.shape
    bias_r, bias_t, bias_v, ban_r, ban_t = [], [], [], [], []
    for i, row in enumerate(rows):
        for t, b in (row.params.logit_bias or {}).items():
            if t < V:  # an id past the vocabulary can never be sampled; nothing to bias
                bias_r.append(i), bias_t.append(t), bias_v.append(float(b))
        for t in _banned_below_min_tokens(row):
            if t < V:
                ban_r.append(i), ban_t.append(t)
    if bias_r:
        logits.index_put_((torch.tensor(bias_r), torch.tensor(bias_t)),
                          torch.tensor(bias_v, dtype=logits.dtype), accumulate=True)
    if ban_r:
        logits[torch.tensor(ban_r), torch.tensor(ban_t)] = float("-inf")

    rep = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if rep:  # HF semantics over prompt + output; duplicates write identical values, so no unique()
        r, t = _pairs(rows, rep, prompt=True)
        pen = torch.tensor([rows[i].params.repetition_penalty for i in range(S)],
                           dtype=logits.dtype)[r]
        v = logits[r, t]
        logits[r, t] = torch.where(v > 0, v / pen, v * pen)

    pf = [i for i, row in enumerate(rows)
          if row.params.presence_penalty or row.params.frequency_penalty]
    if pf:  # OpenAI semantics over OUTPUT tokens only
        r, t = _pairs(rows, pf, prompt=False)
        keys, counts = torch.unique(r * V + t, return_counts=True)
        r, t = keys // V, keys % V
        presence = torch.tensor([row.params.presence_penalty for row in rows], dtype=logits.dtype)
        frequency = torch.tensor([row.params.frequency_penalty for row in rows], dtype=logits.dtype)
        logits[r, t] -= presence[r] + frequency[r] * counts.to(logits.dtype)
    return logits


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [R, V], first index on ties. torch's CPU argmax is scalar code
    (~10x slower than amax here), so reduce chunk maxima with the vectorised amax first, then
    argmax only inside the winning chunk of each row."""
    R, V = x.shape
    C = V // _ARGMAX_CHUNK
    if C < 2 or x.device.type != "cpu":
        return x.argmax(-1)
    head = x[:, :C * _ARGMAX_CHUNK].unflatten(-1, (C, _ARGMAX_CHUNK))
    chunk_max = head.amax(-1)
    best, best_chunk = chunk_max.max(-1)
    idx = best_chunk * _ARGMAX_CHUNK + head[torch.arange(R), best_chunk].argmax(-1)
    if C * _ARGMAX_CHUNK < V:
        tail_max, tail_idx = x[:, C * _ARGMAX_CHUNK:].max(-1)
        idx = torch.where(tail_max > best, C * _ARGMAX_CHUNK + tail_idx, idx)
    return idx


def _pick(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from cumulative weights [R, K]. The target is kept strictly below
    the total, so a zero-weight token (banned, filtered) can never be returned."""
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf.dtype)[:, None] * total, total.nextafter(torch.zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int],
                            num_top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per prompt position: the logprob of the prompt token that actually follows, and the top
    num_top (id, logprob) pairs, descending. logits: [P, V] raw, next_token_ids: P ids."""
    lp = logits.float().log_softmax(-1)
    actual = lp.gather(1, torch.as_tensor(next_token_ids, dtype=torch.long)[:, None]).squeeze(1)
    if num_top > 0:
        top_v, top_i = lp.topk(min(num_top, lp.shape[1]), -1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in range(lp.shape[0])]
    return list(zip(actual.tolist(), tops))


class Sampler:
    """Samples one token per row. Not thread-safe: it keeps work buffers between calls, because
    allocating [S, V] afresh every step costs page faults on CPU (CPU_PERF_NOTES)."""

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(n)
        return buf[:n].view(shape)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [S, V], one row per entry of rows. The caller's tensor is never modified."""
        S, V = logits.shape
        if len(rows) != S:
            raise ValueError(f"{S} rows of logits for {len(rows)} sampling rows")
        raw = logits.float()
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_lp = raw[lp_rows].log_softmax(-1) if lp_rows else None  # before anything edits raw

        work = raw
        if any(_needs_penalties(r) for r in rows):
            if raw is logits:  # the caller's tensor: edit a private copy
                work = self._buffer("work", (S, V)).copy_(raw)
            apply_penalties(work, rows)

        tokens = torch.empty(S, dtype=torch.long)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0.0]
        if greedy:
            tokens[greedy] = fast_argmax(work if len(greedy) == S else work[greedy])
        if len(greedy) < S:
            sampled = [i for i, r in enumerate(rows) if r.params.temperature != 0.0]
            tokens[sampled] = self._sample(work, sampled, rows)

        token_ids = tokens.tolist()
        logprobs: list[float | None] | None = None
        top: list[list[tuple[int, float]] | None] = [None] * S
        if raw_lp is not None:
            logprobs = [None] * S
            chosen = raw_lp.gather(1, tokens[lp_rows][:, None]).squeeze(1).tolist()
            n_max = max(rows[i].params.logprobs for i in lp_rows)
            top_v, top_i = raw_lp.topk(min(n_max, V), -1) if n_max else (raw_lp[:, :0],) * 2
            for j, (i, v, ids, vals) in enumerate(zip(lp_rows, chosen, top_i.tolist(), top_v.tolist())):
                n = rows[i].params.logprobs
                logprobs[i], top[i] = v, list(zip(ids[:n], vals[:n]))
        return SamplerOutput(token_ids, logprobs, top)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        seeded = [j for j, r in enumerate(rows) if r.params.seed is not None]
        u = torch.rand(len(rows), generator=self._generator, dtype=torch.float64)
        if seeded:  # one scalar per seeded row; the unseeded ones were drawn above in one call
            u[seeded] = torch.tensor([seeded_uniform(rows[j].params.seed, rows[j].seed_offset,
                                                     len(rows[j].output_token_ids)) for j in seeded],
                                     dtype=torch.float64)
        return u

    def _sample(self, work: torch.Tensor, idx: list[int], rows: list[SamplingRow]) -> torch.Tensor:
        """Tokens for the non-greedy rows idx of work [S, V]."""
        V = work.shape[1]
        sub = [rows[i] for i in idx]
        u = self._uniforms(sub)
        temp = torch.tensor([r.params.temperature for r in sub])
        top_k = torch.tensor([r.params.top_k if 0 < r.params.top_k < V else V for r in sub])
        top_p = torch.tensor([r.params.top_p for r in sub])
        min_p = torch.tensor([r.params.min_p for r in sub])
        trunc = (top_k < V) | (top_p < 1.0)
        out = torch.empty(len(idx), dtype=torch.long)
        rows_t = torch.tensor(idx)
        if not trunc.all():
            full = (~trunc).nonzero().squeeze(1)
            out[full] = self._sample_full(work, rows_t[full], temp[full], min_p[full], u[full])
        if trunc.any():
            t = trunc.nonzero().squeeze(1)
            L = work if len(t) == work.shape[0] else work[rows_t[t]]
            out[t] = self._sample_truncated(L, temp[t], top_k[t], top_p[t], min_p[t], u[t])
        return out

    def _sample_full(self, work: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor,
                     min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Rows with no top_k / top_p: weights exp((l - max) / T) over the whole vocabulary, built
        in place in one reused buffer. Weights are 1 at the max, so min_p is `w < min_p`."""
        w = self._buffer("weights", (len(idx), work.shape[1]))
        torch.index_select(work, 0, idx, out=w)
        w.sub_(w.amax(-1, keepdim=True))
        if (temp != 1.0).any():
            w.mul_((1.0 / temp)[:, None])
        w.exp_()
        if (min_p > 0).any():
            w.masked_fill_(w < min_p[:, None], 0.0)
        return _pick(w.cumsum_(-1), u)

    def _sample_truncated(self, L: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor,
                          full_sort: bool = False) -> torch.Tensor:
        """Rows with top_k and/or top_p: work on the K best tokens, sorted descending. Rows with
        top_k need only their k; rows with top_p alone probe the best _TOP_P_PROBE and fall back to
        a full sort when their nucleus does not fit (a flat distribution)."""
        V = L.shape[1]
        has_k = top_k < V
        K = int(top_k[has_k].max()) if has_k.any() else 0
        if full_sort:
            K = V
        elif not has_k.all():
            K = max(K, _TOP_P_PROBE)
        if K >= V:
            vals, cand = L.sort(-1, descending=True)
        else:
            vals, cand = L.topk(K, -1)
        vals = vals / temp[:, None]  # temperature on the candidates only: top_k is unaffected by it
        vals.masked_fill_(torch.arange(vals.shape[1]) >= top_k[:, None], float("-inf"))
        w = (vals - vals[:, :1]).exp_()
        # The nucleus is measured against the distribution after top_k: the candidates' own mass
        # for rows with top_k, the whole (temperature-scaled) vocabulary for rows without.
        mass = w.sum(-1)
        if not has_k.all():
            nk = (~has_k).nonzero().squeeze(1)
            mass[nk] = (torch.logsumexp(L[nk] / temp[nk, None], -1) - vals[nk, 0]).exp()
        before = w.cumsum(-1) - w
        keep = (before < (top_p * mass)[:, None]) & (w >= min_p[:, None])
        uncovered = ~has_k & (before[:, -1] + w[:, -1] < top_p * mass) if not full_sort else None
        w.mul_(keep)
        out = cand.gather(1, _pick(w.cumsum(-1), u)[:, None]).squeeze(1)
        if uncovered is not None and uncovered.any():
            r = uncovered.nonzero().squeeze(1)
            out[r] = self._sample_truncated(L[r], temp[r], top_k[r], top_p[r], min_p[r], u[r], True)
        return out
