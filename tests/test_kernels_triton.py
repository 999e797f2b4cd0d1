"""Every Triton kernel against its torch reference (the checks live in kernel_checks.py),
launchers rejecting bad input, and the CPU/CUDA dispatch.

On the CPU the kernels run under Triton's interpreter. TRITON_INTERPRET must be set before
Triton is first imported, so the checks run in one fresh subprocess and nothing leaks into
the rest of the pytest session. With TESSERA_KERNEL_DEVICE=cuda the same checks run in-process
on CUDA tensors, compiled for real, with larger shapes and a cache big enough to overflow
32-bit offsets (scripts/gpu_check.sh runs it so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch

from kernel_checks import DEVICE, FAMILIES, ON_CUDA, check_large_cache
from kernels import activation, kv_write, norm, paged_attention, rotary

CHECKS = pathlib.Path(__file__).with_name("kernel_checks.py")
REPO = CHECKS.parents[1]


@pytest.fixture(scope="module")
def interpreter_failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Runs every family once in one interpreter subprocess (importing torch costs seconds):
    family -> traceback, empty when it passed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install '.[triton]')")
    report = tmp_path_factory.mktemp("kernels") / "failures.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "TESSERA_KERNELS": "triton",
           "TESSERA_KERNEL_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(CHECKS), str(report), *FAMILIES], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and report.exists(), (
        f"interpreter subprocess died:\n{proc.stdout}{proc.stderr}")
    return json.loads(report.read_text())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_kernels_match_reference(family: str, request: pytest.FixtureRequest) -> None:
    if ON_CUDA:
        assert torch.cuda.is_available(), "TESSERA_KERNEL_DEVICE=cuda but no CUDA device"
        FAMILIES[family](torch.device("cuda"))
        return
    failure = request.getfixturevalue("interpreter_failures")[family]
    assert not failure, f"{family} under TRITON_INTERPRET=1:\n{failure}"


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device with ~9 GB free; the interpreter's "
                    "pointer arithmetic is 64-bit anyway")
def test_offsets_past_int32_on_large_cache() -> None:
    check_large_cache(torch.device("cuda"))


# ---- launchers reject bad input ------------------------------------------------------------

def _bad_inputs(dev: str) -> list[tuple[str, Callable[[], object], str]]:
    """(name, call, expected message fragment): each call is wrong in exactly one way."""
    q = torch.randn(3, 4, 64, device=dev)
    kc = torch.randn(8, 16, 2, 64, device=dev)
    tables = torch.zeros(3, 4, dtype=torch.int64, device=dev)
    lens = torch.tensor([5, 9, 17], device=dev)
    pa, x = paged_attention, torch.randn(4, 32, device=dev)
    w = torch.ones(32, device=dev)
    pos = torch.zeros(3, dtype=torch.int64, device=dev)
    cs = torch.randn(10, 64, device=dev)
    return [
        ("decode int query", lambda: pa.paged_attention_decode_triton(
            q.long(), kc, kc, tables, lens, 0.1), "query must be float32"),
        ("decode head_dim not contiguous", lambda: pa.paged_attention_decode_triton(
            q.transpose(1, 2).contiguous().transpose(1, 2), kc, kc, tables, lens, 0.1),
         "contiguous in head_dim"),
        ("decode head_dim mismatch", lambda: pa.paged_attention_decode_triton(
            q[..., :32].contiguous(), kc, kc, tables, lens, 0.1), "head_dim of query"),
        ("decode GQA not divisible", lambda: pa.paged_attention_decode_triton(
            q[:, :3].contiguous(), kc, kc, tables, lens, 0.1), "not a multiple"),
        ("decode cache dtype", lambda: pa.paged_attention_decode_triton(
            q, kc.half(), kc.half(), tables, lens, 0.1), "cache dtype"),
        ("decode float block table", lambda: pa.paged_attention_decode_triton(
            q, kc, kc, tables.float(), lens, 0.1), "block_tables must be int32 or int64"),
        ("decode seq_lens count", lambda: pa.paged_attention_decode_triton(
            q, kc, kc, tables, lens[:2], 0.1), "seq_lens"),
        ("prefill offsets", lambda: pa.paged_attention_prefill_triton(
            q, kc, kc, tables, [0, 1, 2], [5, 9], 0.1), "query_start_loc"),
        ("prefill chunk longer than sequence", lambda: pa.paged_attention_prefill_triton(
            q, kc, kc, tables, [0, 3], [2], 0.1), "must fit"),
        ("prefill table too short", lambda: pa.paged_attention_prefill_triton(
            q, kc, kc, tables, [0, 3], [65], 0.1), "cannot hold"),
        ("kv write slot count", lambda: kv_write.write_kv_cache_triton(
            q[:, :2], q[:, :2], kc, kc, pos[:2]), "slot_mapping has 2 slots"),
        ("kv write head mismatch", lambda: kv_write.write_kv_cache_triton(
            q, q, kc, kc, pos), "key must have shape"),
        ("kv write cache not contiguous", lambda: kv_write.write_kv_cache_triton(
            q[:, :2], q[:, :2], kc.transpose(0, 1), kc.transpose(0, 1), pos), "contiguous"),
        ("norm weight shape", lambda: norm.rms_norm_triton(x, w[:16], 1e-6), "weight must be"),
        ("norm residual shape", lambda: norm.fused_add_rms_norm_triton(
            x, x[:2], w, 1e-6), "residual must match"),
        ("norm int input", lambda: norm.layer_norm_triton(x.long(), w, w, 1e-5), "x must be"),
        ("norm column-strided x", lambda: norm.rms_norm_triton(
            torch.randn(32, 4, device=dev).t(), w, 1e-6), "contiguous apart from"),
        ("rotary half table", lambda: rotary.apply_rotary_triton(
            pos, q, q[:, :2], cs.half()), "cos_sin_cache must be"),
        ("rotary positions count", lambda: rotary.apply_rotary_triton(
            pos[:2], q, q[:, :2], cs), "positions has 2"),
        ("silu odd width", lambda: activation.silu_and_mul_triton(x[:, :31]), "[T, 2*I]"),
        ("gelu non-contiguous", lambda: activation.gelu_tanh_triton(x.t()), "contiguous"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))),
                         ids=[c[0] for c in _bad_inputs("cpu")])
def test_launcher_rejects_bad_input(case: int) -> None:
    name, call, fragment = _bad_inputs(DEVICE)[case]
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert fragment in str(err.value), f"{name}: {err.value}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter runs CPU")
def test_launcher_rejects_cpu_tensors_without_interpreter() -> None:
    with pytest.raises(ValueError, match="need CUDA tensors"):
        activation.silu_and_mul_triton(torch.randn(2, 8))


# ---- dispatch ------------------------------------------------------------------------------

def test_cpu_tensors_dispatch_to_the_reference() -> None:
    """CPU tensors never reach Triton under `auto`: float32 ones run the C++ CPU kernels when
    they built (kernels/cpu_ext.py; close to the reference), otherwise the reference itself."""
    import kernels
    from kernels.cpu_ext import use_cpu_kernels

    if kernels.kernel_backend() != "auto":
        pytest.skip("TESSERA_KERNELS overrides the dispatch")
    gen = torch.Generator().manual_seed(7)
    x, res, w, b = (torch.randn(3, 16, generator=gen) for _ in range(4))
    w, b = w[0], b[0]
    same = (lambda a, r: torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)) \
        if use_cpu_kernels(x) else (lambda a, r: torch.equal(a, r) or pytest.fail("differs"))
    same(kernels.silu_and_mul(x), activation.silu_and_mul_ref(x))
    assert torch.equal(kernels.gelu_tanh(x), activation.gelu_tanh_ref(x))
    same(kernels.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6))
    for a, r in zip(kernels.fused_add_layer_norm(x, res, w, b, 1e-5),
                    norm.fused_add_layer_norm_ref(x, res, w, b, 1e-5)):
        assert torch.equal(a, r)
    q, kc = torch.randn(2, 4, 16, generator=gen), torch.randn(4, 4, 2, 16, generator=gen)
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 8])
    same(kernels.paged_attention_decode(q, kc, kc, tables, lens, 0.3, 3),
         paged_attention.paged_attention_decode_ref(q, kc, kc, tables, lens, 0.3, 3))
    same(kernels.paged_attention_prefill(q, kc, kc, tables, [0, 1, 2], [5, 8], 0.3),
         paged_attention.paged_attention_prefill_ref(q, kc, kc, tables, [0, 1, 2], [5, 8], 0.3))


def test_forcing_triton_routes_cpu_tensors_to_the_launcher() -> None:
    import kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter the launcher accepts CPU tensors")
    before = kernels.kernel_backend()
    kernels.set_kernel_backend("triton")
    try:
        with pytest.raises((ValueError, RuntimeError), match="CUDA tensors|needs Triton|not installed"):
            kernels.silu_and_mul(torch.randn(2, 8))
    finally:
        kernels.set_kernel_backend(before)
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.set_kernel_backend("cuda")




# ---- compiled for a real GPU target, without one ------------------------------------------

def _compile_cases() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(name, kernel, argument types, constexprs, num_warps) for bfloat16 and float32."""
    import importlib

    dec = importlib.import_module("kernels.paged_attention_decode")
    pre = importlib.import_module("kernels.paged_attention_prefill")
    cases = []
    for dt in ("bf16", "fp32"):
        p, i32 = f"*{dt}", "i32"
        cases += [
            (f"silu_and_mul {dt}", activation._silu_and_mul_kernel,
             dict(x_ptr=p, out_ptr=p, stride_x=i32, inter=i32), dict(BLOCK_I=1024), 4),
            (f"gelu_tanh {dt}", activation._gelu_tanh_kernel, dict(x_ptr=p, out_ptr=p, n=i32),
             dict(BLOCK_N=1024), 4),
            (f"write_kv_cache {dt}", kv_write._write_kv_cache_kernel,
             dict(key_ptr=p, value_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slot_ptr="*i64",
                  stride_key=i32, stride_value=i32, row_size=i32), dict(BLOCK_R=1024), 4),
            (f"rotary {dt}", rotary._rotary_kernel,
             dict(positions_ptr="*i64", q_ptr=p, k_ptr=p, cos_sin_ptr="*fp32", stride_q=i32,
                  stride_k=i32, num_heads=i32, num_kv_heads=i32),
             dict(HALF=40, BLOCK_HALF=64, BLOCK_H=32), 4),
        ]
        for res, rms in ((True, True), (False, False)):
            cases.append((f"norm {dt} residual={res} rms={rms}", norm._norm_kernel,
                          dict(x_ptr=p, res_ptr=p, weight_ptr=p, bias_ptr=p, out_ptr=p,
                               res_out_ptr=p, stride_x=i32, stride_res=i32, hidden=i32,
                               eps="fp32"), dict(BLOCK_H=4096, HAS_RESIDUAL=res, IS_RMS=rms), 8))
        attn = dict(q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, tables_ptr="*i64", out_ptr=p,
                    scale_log2="fp32", window=i32, group=i32, head_dim=i32, block_size=i32,
                    stride_kb=i32, stride_kt=i32, stride_kh=i32, stride_bt=i32)
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        # Every head size the models use (BLOCK_D 16 .. 256, BLOCK_N 16 above 128), with the
        # launchers' own parameters; group 1 (no GQA) is an integer Triton specializes.
        for d in (16, 32, 64, 80, 128, 256):
            for group in {64: (1, 4), 128: (1, 4, 32)}.get(d, (4,)):
                meta = dec.decode_meta(d, group, dtype)
                warps = meta.pop("num_warps")
                for split in ((False, True) if group in (1, 32) or d == 256 else (False,)):
                    consts = dict(meta, HAS_WINDOW=d == 80, SPLIT=split,
                                  **({"group": 1} if group == 1 else {}))
                    cases.append((f"decode {dt} D={d} group={group} split={split} {meta}",
                                  dec._paged_decode_kernel,
                                  dict(attn, seq_lens_ptr="*i64", stride_qs=i32, stride_qh=i32,
                                       stride_os=i32, part_acc_ptr="*fp32", part_ml_ptr="*fp32",
                                       num_splits=i32), consts, warps))
                if d in (64, 128, 256) and group != 32:
                    cases.append((f"decode merge {dt} D={d}", dec._paged_decode_merge_kernel,
                                  dict(part_acc_ptr="*fp32", part_ml_ptr="*fp32", out_ptr=p,
                                       group=i32, head_dim=i32, num_splits=i32, stride_os=i32),
                                  dict(BLOCK_G=meta["BLOCK_G"], BLOCK_D=meta["BLOCK_D"],
                                       **({"group": 1} if group == 1 else {})), 4))
            meta = pre.prefill_meta(d, dtype)
            warps = meta.pop("num_warps")
            cases.append((f"prefill {dt} D={d} {meta}", pre._paged_prefill_kernel,
                          dict(attn, query_start_ptr="*i32", seq_lens_ptr="*i32",
                               tile_seq_ptr="*i32", tile_start_ptr="*i32", stride_qt=i32,
                               stride_qh=i32, stride_ot=i32),
                          dict(meta, HAS_WINDOW=d == 128), warps))
    return cases


@pytest.mark.skipif(ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="on CUDA the kernel tests compile them for real")
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """Code generation down to an sm_90 cubin (what the H100/H200 runs) catches what the
    interpreter cannot: compile-time typing, dot shapes, register spills."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failures = []
    for name, kernel, types, consts, num_warps in _compile_cases():
        names = kernel.arg_names
        signature = {n: "constexpr" if n in consts else types[n] for n in names}
        constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
        try:
            with warnings.catch_warnings():   # triton 3.9 warns about its FP-fusion default
                warnings.simplefilter("ignore", UserWarning)
                triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                               options={"num_warps": num_warps})
        except Exception as e:   # noqa: BLE001 - collect every kernel's failure
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)
