"""The batched sampler: next-token logits [S, V] plus per-row sampling parameters -> one token each.

Order is vLLM's: logit_bias and min_tokens, repetition penalty, presence and frequency penalties,
temperature, top_k, top_p, min_p, then the draw. Greedy rows (temperature 0) take the argmax of the
penalised logits. Logprobs come from the RAW distribution (log_softmax of the logits as given),
vLLM v1's default. Processors run on all rows at once and are skipped when no row uses them.

NOTE on the draw: one uniform u per row and inverse-CDF sampling (first i with cumsum(w)[i] >
u * sum(w)): the distribution of the exponential race argmax(p / Exp(1)), without its V random
numbers per row (`exponential_` over [256, 32000] costs ~230 ms on our 2-core CPUs). A seeded row's
u is a counter-based hash of (seed, seed_offset, token index), so its tokens do not depend on the
rest of the batch, its position, or a preemption in between.

NOTE on devices: sampling runs where the logits are (on a GPU, no [S, V] copy to the host);
only the S uniforms come from the host (the seeded hash and the CPU generator) and the S
tokens go back. Every index and parameter tensor is built on the logits' device.

NOTE on top_p: rows with top_k find their nucleus by sorting their k candidates. Rows without top_k
never sort the vocabulary (~1 s for [256, 32000] here): they draw from the whole distribution and
reject a token whose more-probable mass already reaches top_p, redrawing above it (FlashInfer's
pivot scheme). A round accepts with probability >= top_p, so ~1 / top_p rounds; exact, except
that tokens tied with the last nucleus token are all kept.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from common.sampling_params import SamplingParams
from worker.structured import apply_grammar_bitmask

_MASK64 = (1 << 64) - 1
_ARGMAX_CHUNK = 128   # amax is vectorised, argmax is not: reduce chunks first
_TOPK_CHUNK = 64      # candidates for top-k: the k chunks with the highest maxima
Undo = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SamplingRow:
    """One sequence of the batch: what the sampler needs to know about it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]      # generated so far: penalties, min_tokens, token index
    seed_offset: int = 0                 # child index: the n sequences of one seeded request differ
    eos_token_ids: tuple[int, ...] = ()  # from the model config; banned below min_tokens
    grammar: Any = None                  # structured output: worker.structured.SequenceGrammar


@dataclass
class SamplerOutput:
    token_ids: list[int]                                 # one per row
    logprobs: list[float | None] | None                  # sampled token's raw logprob; None: no row asked
    top_logprobs: list[list[tuple[int, float]] | None]   # per row: top-N (id, logprob), descending


def seeded_uniform(seed: int, seed_offset: int, token_index: int, draw: int = 0) -> float:
    """A uniform in [0, 1) that depends only on its key (a splitmix64 chain): stable across
    processes and torch versions, and free of generator state that earlier draws would shift."""
    h = 0
    for part in (seed, seed_offset, token_index, draw):
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


def _flat_keys(rows: list[SamplingRow], which: list[int], V: int, prompt: bool) -> torch.Tensor:
    """row * V + token for every token of the chosen rows (output, plus prompt if asked)."""
    seqs = [chain(rows[i].prompt_token_ids, rows[i].output_token_ids) if prompt
            else rows[i].output_token_ids for i in which]
    counts = [len(rows[i].output_token_ids) + prompt * len(rows[i].prompt_token_ids) for i in which]
    buf = array("q", chain.from_iterable(seqs))  # one C-level copy; per-row tensors cost 40 us each
    toks = torch.frombuffer(buf, dtype=torch.long) if buf else torch.empty(0, dtype=torch.long)
    return torch.tensor(which).repeat_interleave(torch.tensor(counts)) * V + toks


def _edit(flat: torch.Tensor, keys: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
          undo: Undo | None) -> None:
    old = flat.take(keys)  # take / index_put_: 3x faster than flat[keys] on CPU
    if undo is not None:
        undo.append((keys, old))
    flat.index_put_((keys,), fn(old))  # duplicate keys write identical values: no unique()


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], undo: Undo | None = None) -> torch.Tensor:
    """Apply logit_bias, min_tokens bans, repetition (HF), presence and frequency (OpenAI, output
    tokens only) penalties IN PLACE to a contiguous float [S, V] and return it. Touches O(tokens)
    entries, never a pass over [S, V]; with `undo`, records old values so the caller can restore."""
    S, V = logits.shape
    flat, dev = logits.view(-1), logits.device
    bias_k, bias_v, ban_k = [], [], []
    for i, row in enumerate(rows):
        for t, b in (row.params.logit_bias or {}).items():
            if t < V:  # an id past the vocabulary can never be sampled: nothing to bias
                bias_k.append(i * V + t), bias_v.append(float(b))
        ban_k.extend(i * V + t for t in _banned_below_min_tokens(row) if t < V)
    if bias_k:
        _edit(flat, torch.tensor(bias_k, device=dev),
              lambda old: old + torch.tensor(bias_v, device=dev), undo)
    if ban_k:
        _edit(flat, torch.tensor(ban_k, device=dev),
              lambda old: torch.full_like(old, float("-inf")), undo)
    rep = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if rep:
        keys = _flat_keys(rows, rep, V, prompt=True).to(dev)
        pen = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[keys // V]
        _edit(flat, keys, lambda old: torch.where(old > 0, old / pen, old * pen), undo)
    pf = [i for i, row in enumerate(rows) if row.params.presence_penalty or row.params.frequency_penalty]
    if pf:
        keys, counts = torch.unique(_flat_keys(rows, pf, V, prompt=False).to(dev),
                                    return_counts=True)
        r = keys // V
        presence = torch.tensor([row.params.presence_penalty for row in rows], device=dev)[r]
        frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=dev)[r]
        _edit(flat, keys, lambda old: old - presence - frequency * counts, undo)
    return logits


def _chunk_rows(x: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """[len(starts), width] copies of x's flat storage at the given offsets (one index_select)."""
    return x.reshape(-1).unfold(0, width, 1).index_select(0, starts)


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of a contiguous [R, V], first index on ties. torch's CPU argmax
    is scalar code (~10x slower than amax here): reduce chunk maxima first, then argmax inside the
    winning chunk only."""
    R, V = x.shape
    B = _ARGMAX_CHUNK
    C = V // B
    if C < 2 or x.device.type != "cpu":   # the chunking works around the CPU kernel only
        return x.argmax(-1)
    best, best_chunk = x[:, :C * B].unflatten(-1, (C, B)).amax(-1).max(-1)
    idx = best_chunk * B + _chunk_rows(x, torch.arange(R) * V + best_chunk * B, B).argmax(-1)
    if C * B < V:
        tail_max, tail_idx = x[:, C * B:].max(-1)
        idx = torch.where(tail_max > best, C * B + tail_idx, idx)
    return idx


def fast_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted top-k (values, ids) over the last dim of a contiguous [R, V]. The top k lie in the k
    chunks with the highest maxima, so only those k * 64 candidates are ranked (3x cheaper than
    torch.topk over the whole row at k = 50, V = 32000)."""
    R, V = x.shape
    B = _TOPK_CHUNK
    C = V // B
    if k * B * 4 > V or x.device.type != "cpu":   # the chunking works around the CPU kernel
        return x.topk(k, -1)
    _, chunks = x[:, :C * B].unflatten(-1, (C, B)).amax(-1).topk(k, -1, sorted=False)
    cand = _chunk_rows(x, (torch.arange(R)[:, None] * V + chunks * B).flatten(), B).view(R, k * B)
    ids = (chunks[:, :, None] * B + torch.arange(B)).flatten(1)
    if C * B < V:
        cand = torch.cat([cand, x[:, C * B:]], 1)
        ids = torch.cat([ids, torch.arange(C * B, V).expand(R, -1)], 1)
    vals, pos = cand.topk(k, -1)
    return vals, ids.gather(1, pos)


def _pick(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from cumulative weights [R, K]. The target stays strictly below
    the total, so a zero-weight (banned or filtered) token can never be returned."""
    total = cdf[:, -1:]
    u = u.to(cdf.device, cdf.dtype)   # the uniforms come from the host
    target = torch.minimum(u[:, None] * total, total.nextafter(total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int],
                            num_top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per prompt position: the logprob of the prompt token that actually follows, and the top
    num_top (id, logprob) pairs, descending. logits: [P, V] raw; next_token_ids: P ids."""
    lp = logits.float().log_softmax(-1)
    index = torch.as_tensor(next_token_ids, dtype=torch.long, device=lp.device)
    actual = lp.gather(1, index[:, None]).squeeze(1)
    tops: list[list[tuple[int, float]]] = [[] for _ in range(lp.shape[0])]
    if num_top > 0:
        top_v, top_i = lp.topk(min(num_top, lp.shape[1]), -1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    return list(zip(actual.tolist(), tops))


class Sampler:
    """Samples one token per row. Keeps work buffers between calls (fresh [S, V] allocations cost
    page faults on CPU, see CPU_PERF_NOTES), so one instance serves one thread."""

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        self._generator.seed() if seed is None else self._generator.manual_seed(seed)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < shape.numel() or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape.numel(), device=device)
        return buf[:shape.numel()].view(shape)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [S, V], one row per entry of rows. The caller's tensor is left as it was,
        except that rows with a grammar are masked in place (their distribution is the
        masked one, logprobs included)."""
        S, V = logits.shape
        if len(rows) != S:
            raise ValueError(f"{S} rows of logits for {len(rows)} sampling rows")
        # ---- structured output hook (worker/structured.py): the grammar's bitmask comes
        # before any other logits processing; rows of one sequence may repeat (each is
        # synced to its own output tokens). Nothing below this block knows about grammars.
        if any(r.grammar is not None for r in rows):
            apply_grammar_bitmask(logits, rows)
        # ---- end of the structured output hook
        if logits.device.type != "cpu" and all(
                r.params.temperature == 0 and r.params.logprobs is None
                and not _needs_penalties(r) for r in rows):
            # An all-greedy batch on an accelerator: one argmax, S ints cross the bus.
            return SamplerOutput(logits.argmax(-1).tolist(), None, [None] * S)
        work = logits.float().contiguous()
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_lp = work[lp_rows].log_softmax(-1) if lp_rows else None  # before any edit
        # NOTE: penalties edit the caller's tensor in place and are undone below: they touch
        # O(tokens) entries, where a private copy would cost a full pass over [S, V].
        undo: Undo | None = [] if work is logits else None
        try:
            if any(_needs_penalties(r) for r in rows):
                apply_penalties(work, rows, undo)
            tokens = self._tokens(work, rows)
        finally:
            for keys, old in reversed(undo or []):
                work.view(-1).index_put_((keys,), old)

        logprobs: list[float | None] | None = None if raw_lp is None else [None] * S
        top: list[list[tuple[int, float]] | None] = [None] * S
        if raw_lp is not None:
            chosen = raw_lp.gather(1, tokens[lp_rows][:, None]).squeeze(1).tolist()
            top_v, top_i = raw_lp.topk(min(max(rows[i].params.logprobs for i in lp_rows), V), -1)
            for i, v, ids, vals in zip(lp_rows, chosen, top_i.tolist(), top_v.tolist()):
                n = rows[i].params.logprobs
                logprobs[i], top[i] = v, list(zip(ids[:n], vals[:n]))
        return SamplerOutput(tokens.tolist(), logprobs, top)

    def _tokens(self, work: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        S, V = work.shape
        tokens = torch.empty(S, dtype=torch.long, device=work.device)
        groups: dict[str, list[int]] = {"greedy": [], "top_k": [], "full": []}
        for i, r in enumerate(rows):
            p = r.params
            groups["greedy" if p.temperature == 0 else "top_k" if 0 < p.top_k < V else "full"].append(i)
        for name, idx in groups.items():
            if idx:  # a subset is copied out once; a whole batch is used in place
                x = work if len(idx) == S else work[idx]
                sub = [rows[i] for i in idx]
                tokens[idx] = (fast_argmax(x) if name == "greedy" else
                               self._sample_top_k(x, sub) if name == "top_k" else self._sample_full(x, sub))
        return tokens

    def _uniforms(self, rows: list[SamplingRow], draw: int = 0) -> torch.Tensor:
        u = torch.rand(len(rows), generator=self._generator, dtype=torch.float64)
        seeded = [j for j, r in enumerate(rows) if r.params.seed is not None]
        if seeded:  # the only per-row loop: one hash per seeded row
            u[seeded] = torch.tensor([seeded_uniform(rows[j].params.seed, rows[j].seed_offset,
                                                     len(rows[j].output_token_ids), draw)
                                      for j in seeded], dtype=torch.float64)
        return u

    def _sample_top_k(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Rows with top_k: temperature, top_p and min_p on their k sorted candidates only."""
        dev = x.device
        top_k = torch.tensor([r.params.top_k for r in rows], device=dev)
        temp, top_p, min_p = (torch.tensor([getattr(r.params, f) for r in rows], device=dev)
                              for f in ("temperature", "top_p", "min_p"))
        vals, ids = fast_topk(x, max(r.params.top_k for r in rows))
        vals = vals / temp[:, None]
        vals.masked_fill_(torch.arange(vals.shape[1], device=dev) >= top_k[:, None],
                          float("-inf"))
        w = (vals - vals[:, :1]).exp_()  # 1 at the best token: min_p is `w >= min_p`
        before = w.cumsum(-1) - w        # mass strictly ahead in the sorted order
        keep = (before < (top_p * w.sum(-1))[:, None]) & (w >= min_p[:, None])
        return ids.gather(1, _pick(w.mul_(keep).cumsum_(-1), self._uniforms(rows))[:, None]).squeeze(1)

    def _sample_full(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Rows without top_k: weights exp((l - max) / T) over the whole vocabulary, built in one
        reused buffer; top_p by rejection (module note)."""
        temp, top_p, min_p = (torch.tensor([getattr(r.params, f) for r in rows], device=x.device)
                              for f in ("temperature", "top_p", "min_p"))
        w = self._buffer("weights", x.shape, x.device)
        inv_t = (1.0 / temp)[:, None]
        torch.addcmul(-x.amax(-1, keepdim=True) * inv_t, x, inv_t, out=w).exp_()
        mass = w.sum(-1) if (top_p < 1).any() else None  # before min_p: top_p comes first
        if (min_p > 0).any():
            w.masked_fill_(w < min_p[:, None], 0.0)
        cdf = torch.cumsum(w, -1, out=self._buffer("cdf", x.shape, x.device))
        tokens = _pick(cdf, self._uniforms(rows))
        todo, draw = (top_p < 1).nonzero().squeeze(1), 0
        while todo.numel():
            wr = w if todo.numel() == len(rows) else w[todo]
            pivot = wr.gather(1, tokens[todo][:, None])
            ahead = torch.where(wr > pivot, wr, 0.0).sum(-1)
            rejected = ahead >= top_p[todo] * mass[todo]
            todo, pivot, draw = todo[rejected], pivot[rejected], draw + 1
            if todo.numel():  # the nucleus lies strictly above a rejected token: redraw there
                wr = w[todo].masked_fill_(w[todo] <= pivot, 0.0).cumsum_(-1)
                tokens[todo] = _pick(wr, self._uniforms([rows[j] for j in todo.tolist()], draw))
        return tokens
