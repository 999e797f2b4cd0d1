"""The checks behind tests/test_kernels_triton.py: each kernel family against its torch
reference on random inputs, raising AssertionError on a mismatch.

Run as a script (`python tests/kernel_checks.py REPORT.json FAMILY...`) in a subprocess with
TRITON_INTERPRET=1 on the CPU, or imported and called with a CUDA device
(TESSERA_KERNEL_DEVICE=cuda adds larger shapes). Outputs the kernels allocate are poisoned
with NaN, so an element a kernel forgets to write fails the comparison; in-place outputs
(caches, rotary) start from random values.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Iterator

import torch

from kernels import activation, kv_write, norm, paged_attention, rotary

DEVICE = os.environ.get("TESSERA_KERNEL_DEVICE", "cpu")
ON_CUDA = DEVICE == "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(atol=3e-5, rtol=3e-5), F16: dict(atol=3e-3, rtol=3e-3),
       BF16: dict(atol=2.5e-2, rtol=2.5e-2)}


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """torch.empty / empty_like return NaN-filled float tensors while active."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))            # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def randn(*shape: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
          ) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def check_activation(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (F32, F16, BF16):
        for t, inter in ((5, 40), (3, 1100)):     # 1100 > one 1024-wide program per row
            x = randn(t, 2 * inter, dtype=dtype, device=device, gen=gen) * 3
            with poisoned_outputs():
                got_silu, got_gelu = activation.silu_and_mul_triton(x), activation.gelu_tanh_triton(x)
            torch.testing.assert_close(got_silu, activation.silu_and_mul_ref(x), **TOL[dtype])
            torch.testing.assert_close(got_gelu, activation.gelu_tanh_ref(x), **TOL[dtype])


def check_norm(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    for dtype in (F32, F16, BF16):
        for t, hidden in ((5, 48), (4, 100)):
            wide = randn(t, hidden + 7, dtype=dtype, device=device, gen=gen)
            x = wide[:, :hidden]                  # strided rows, as a view of a wider output
            res = randn(t, hidden, dtype=dtype, device=device, gen=gen)
            w = randn(hidden, dtype=dtype, device=device, gen=gen)
            b = randn(hidden, dtype=dtype, device=device, gen=gen)
            with poisoned_outputs():
                got = [norm.rms_norm_triton(x, w, 1e-6),
                       *norm.fused_add_rms_norm_triton(x, res, w, 1e-6),
                       norm.layer_norm_triton(x, w, b, 1e-5),
                       *norm.fused_add_layer_norm_triton(x, res, w, b, 1e-5)]
            want = [norm.rms_norm_ref(x, w, 1e-6), *norm.fused_add_rms_norm_ref(x, res, w, 1e-6),
                    norm.layer_norm_ref(x, w, b, 1e-5),
                    *norm.fused_add_layer_norm_ref(x, res, w, b, 1e-5)]
            for g, r in zip(got, want):
                assert g.dtype == r.dtype and g.shape == r.shape
                torch.testing.assert_close(g, r, **TOL[dtype])
            # The interpreter rounds float32 -> bfloat16 towards zero, CUDA to nearest.
            exact = dict(atol=0, rtol=0) if dtype != BF16 or ON_CUDA else TOL[dtype]
            torch.testing.assert_close(got[2], x + res, **exact)
            torch.testing.assert_close(got[5], x + res, **exact)


def check_rotary(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    cases = [(F32, 4, 2, 64, "default"), (F16, 3, 1, 80, "llama3"), (BF16, 8, 2, 64, "llama3")]
    for dtype, hq, hkv, d, rope_type in cases:
        inv = rotary.rope_inv_freq(d, 500000.0, rope_type, factor=8.0,
                                   original_max_position_embeddings=64)
        cache = rotary.build_cos_sin_cache(inv, 300).to(device)
        t = 7
        qkv = randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device, gen=gen)
        q = qkv[:, :hq * d].view(t, hq, d)       # strided views, as the model passes them
        k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
        pos = torch.randint(0, 300, (t,), generator=gen).to(device)
        q_ref, k_ref = q.clone(), k.clone()
        rotary.apply_rotary_ref(pos, q_ref, k_ref, cache)
        v_before = qkv[:, (hq + hkv) * d:].clone()
        rotary.apply_rotary_triton(pos, q, k, cache)
        torch.testing.assert_close(q, q_ref, **TOL[dtype])
        torch.testing.assert_close(k, k_ref, **TOL[dtype])
        assert torch.equal(qkv[:, (hq + hkv) * d:], v_before), "rotary wrote outside q and k"


def check_kv_write(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype, index_dtype, block_size in ((F32, torch.int64, 16), (F16, torch.int32, 32)):
        num_blocks, hkv, d, t = 9, 2, 80, 21
        k_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device, gen=gen)
        v_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device, gen=gen)
        kv = randn(t, 2 * hkv * d + 5, dtype=dtype, device=device, gen=gen)
        key = kv[:, :hkv * d].view(t, hkv, d)
        value = kv[:, hkv * d:2 * hkv * d].view(t, hkv, d)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:t].to(device, index_dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        kv_write.write_kv_cache_ref(key, value, k_ref, v_ref, slots.long())
        kv_write.write_kv_cache_triton(key, value, k_cache, v_cache, slots)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def _attention_cases() -> list[tuple]:
    """(dtype, Hq, Hkv, head_dim, block_size, sliding_window): every dtype x GQA ratio 1/2/4,
    head sizes 64/80, block sizes 16/32, window on/off spread over them."""
    cases = [(F32, 2, 2, 64, 16, None), (F32, 4, 2, 80, 32, 24), (F32, 4, 1, 80, 16, None),
             (F16, 2, 2, 80, 16, 24), (F16, 4, 2, 64, 32, None), (F16, 4, 1, 64, 16, 24),
             (BF16, 4, 2, 80, 32, None)]
    if ON_CUDA:
        cases += [(BF16, 32, 8, 128, 16, None), (F16, 8, 8, 128, 32, 100), (F32, 8, 2, 128, 16, 40)]
    return cases


def check_attention(device: torch.device) -> None:
    """A batch as the runner builds it: decodes first, then prompt chunks (one-token ones, new
    prompts, chunks after a cached prefix, chunks longer than a query tile); K/V written
    through the slot mapping, then decode and prefill attention over scattered blocks."""
    decode_lens = [1, 9, 33, 70]                                     # cache lengths after write
    chunks = [(0, 1), (40, 1), (0, 7), (13, 19), (50, 37)]           # (cached prefix, chunk)
    if ON_CUDA:
        chunks += [(30, 130), (0, 200)]                              # several 64-query tiles
    for i, (dtype, hq, hkv, d, bs, window) in enumerate(_attention_cases()):
        gen = torch.Generator().manual_seed(10 + i)
        index_dtype = torch.int32 if i % 2 else torch.int64
        seq_lens = decode_lens + [c + q for c, q in chunks]
        q_lens = [1] * len(decode_lens) + [q for _, q in chunks]
        need = [math.ceil(n / bs) for n in seq_lens]
        num_blocks = sum(need) + 5
        perm = torch.randperm(num_blocks, generator=gen).tolist()    # blocks in random order
        tables, slots = torch.full((len(seq_lens), max(need) + 1), perm[-1]), []
        for s, (n, q) in enumerate(zip(seq_lens, q_lens)):
            tables[s, :need[s]] = torch.tensor(perm[:need[s]])
            perm = perm[need[s]:]
            slots += [int(tables[s, p // bs]) * bs + p % bs for p in range(n - q, n)]
        tables = tables.to(device, index_dtype)
        slots_t = torch.tensor(slots).to(device, index_dtype)
        t, nd = sum(q_lens), len(decode_lens)
        qkv = randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device, gen=gen)
        q = qkv[:, :hq * d].view(t, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
        k_cache = randn(num_blocks, bs, hkv, d, dtype=dtype, device=device, gen=gen)
        v_cache = randn(num_blocks, bs, hkv, d, dtype=dtype, device=device, gen=gen)
        lens_t = torch.tensor(seq_lens[:nd]).to(device, index_dtype)
        qsl = [0]
        for n in q_lens[nd:]:
            qsl.append(qsl[-1] + n)
        scale = d ** -0.5

        kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
        kv_write.write_kv_cache_ref(k, v, kc_ref, vc_ref, slots_t.long())
        dec_ref = paged_attention.paged_attention_decode_ref(
            q[:nd], kc_ref, vc_ref, tables[:nd].long(), lens_t.long(), scale, window)
        pre_ref = paged_attention.paged_attention_prefill_ref(
            q[nd:], kc_ref, vc_ref, tables[nd:].long(), qsl, seq_lens[nd:], scale, window)
        with poisoned_outputs():
            kv_write.write_kv_cache_triton(k, v, k_cache, v_cache, slots_t)
            dec = paged_attention.paged_attention_decode_triton(
                q[:nd], k_cache, v_cache, tables[:nd], lens_t, scale, window)
            # Split-KV, forced (the interpreter never chooses it): ranges of whole tiles,
            # some empty, merged by the second kernel.
            dec_split = paged_attention.paged_attention_decode_triton(
                q[:nd], k_cache, v_cache, tables[:nd], lens_t, scale, window,
                num_splits=2 + i % 3)
            pre = paged_attention.paged_attention_prefill_triton(
                q[nd:], k_cache, v_cache, tables[nd:], qsl, seq_lens[nd:], scale, window)
        case = f"case {i}: {dtype} Hq={hq} Hkv={hkv} D={d} block={bs} window={window}"
        assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), case
        torch.testing.assert_close(dec, dec_ref, **TOL[dtype], msg=lambda m: f"{case} decode: {m}")
        torch.testing.assert_close(dec_split, dec_ref, **TOL[dtype],
                                   msg=lambda m: f"{case} split decode: {m}")
        torch.testing.assert_close(pre, pre_ref, **TOL[dtype], msg=lambda m: f"{case} prefill: {m}")


def check_large_cache(device: torch.device) -> None:
    """A cache past 2**31 elements per tensor: block_id * block stride overflows int32, so the
    last blocks are only reachable with 64-bit offsets. CUDA only (8.6 GB)."""
    hkv, d, bs, dtype = 8, 128, 16, F16
    num_blocks = 2 ** 31 // (bs * hkv * d) + 64
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    gen = torch.Generator().manual_seed(5)
    n = 40                                               # tokens, all in the last blocks
    table = torch.arange(num_blocks - 3, num_blocks).flip(0)[None].to(device)
    pos = torch.arange(n)
    slots = (table[0, pos // bs].cpu() * bs + pos % bs).to(device)
    k = randn(n, hkv, d, dtype=dtype, device=device, gen=gen)
    v = randn(n, hkv, d, dtype=dtype, device=device, gen=gen)
    q = randn(n, 4 * hkv, d, dtype=dtype, device=device, gen=gen)
    kv_write.write_kv_cache_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, hkv, d)[slots], k), "64-bit slot offsets"
    lens = torch.tensor([n], device=device)
    dec = paged_attention.paged_attention_decode_triton(q[-1:], k_cache, v_cache, table, lens, 0.1)
    pre = paged_attention.paged_attention_prefill_triton(q, k_cache, v_cache, table, [0, n], [n], 0.1)
    torch.testing.assert_close(dec, paged_attention.paged_attention_decode_ref(
        q[-1:], k_cache, v_cache, table, lens, 0.1), **TOL[dtype])
    torch.testing.assert_close(pre, paged_attention.paged_attention_prefill_ref(
        q, k_cache, v_cache, table, [0, n], [n], 0.1), **TOL[dtype])


def check_runner(device: torch.device) -> None:
    """The whole model through the dispatching names: Triton against torch on the same device,
    over steps that mix decodes, new prompts and a chunk after a cached prefix."""
    import tempfile

    import kernels
    from common.model_config import ModelConfig
    from tessera.make_model import make_model
    from worker.runner import ModelRunner, SequenceInput

    before = kernels.kernel_backend()
    try:
        for arch in ("llama", "qwen2", "gpt2"):   # rope + GQA 2; GQA 4 + bias; LayerNorm + GELU
            cfg = ModelConfig.from_dir(make_model(tempfile.mkdtemp() + "/m", arch, preset="tiny"))
            p = [[(7 * i + 3 * j) % cfg.vocab_size for j in range(n)] for i, n in enumerate((1, 5, 23))]
            tables = [[3, 0], [5, 1], [2, 4]]
            steps = [[(p[0], 0), (p[1], 0), (p[2][:16], 0)],                # decode-like + prompts
                     [([11], 1), ([12], 5), (p[2][16:], 16)],               # decodes + a chunk
                     [([13], 2), ([14], 6), ([15], 23)]]                    # decodes
            logits = {}
            for backend in ("torch", "triton"):
                kernels.set_kernel_backend(backend)
                runner = ModelRunner(cfg, "float32", num_blocks=6, block_size=16, device=device)
                logits[backend] = [
                    runner.execute([SequenceInput(ids, start, t) for (ids, start), t
                                    in zip(step, tables)], all_logits=True).all_logits
                    for step in steps]
            for step, (ours, ref) in enumerate(zip(logits["triton"], logits["torch"])):
                for seq, (a, b) in enumerate(zip(ours, ref)):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4,
                                               msg=lambda m: f"{arch} step {step} seq {seq}: {m}")
    finally:
        kernels.set_kernel_backend(before)


FAMILIES: dict[str, Callable[[torch.device], None]] = {
    "activation": check_activation, "norm": check_norm, "rotary": check_rotary,
    "kv_write": check_kv_write, "attention": check_attention, "runner": check_runner,
}


if __name__ == "__main__":
    # python tests/kernel_checks.py REPORT.json FAMILY... (run by test_kernels_triton.py)
    failures = {}
    for family in sys.argv[2:]:
        try:
            FAMILIES[family](torch.device(DEVICE))
            failures[family] = ""
        except Exception:
            failures[family] = traceback.format_exc()
        print(f"{family}: {'FAILED' if failures[family] else 'ok'}", flush=True)
    pathlib.Path(sys.argv[1]).write_text(json.dumps(failures))
