"""Fused ops behind one function each: a Triton kernel for CUDA tensors, a plain-torch reference
for CPU tensors (and as the test oracle). The model runner calls only these names.

Each op's module (kernels/<op>.py) also defines `<name>_ref` (the torch reference) and `<name>_triton` (the
launcher). `TESSERA_KERNELS=auto|triton|torch` or `set_kernel_backend` picks the path; see
kernels/_triton.py.
"""

from kernels._triton import HAS_TRITON, kernel_backend, set_kernel_backend, use_triton
from kernels.activation import gelu_tanh, silu_and_mul
from kernels.kv_write import write_kv_cache
from kernels.norm import fused_add_layer_norm, fused_add_rms_norm, layer_norm, rms_norm
from kernels.paged_attention import paged_attention_decode, paged_attention_prefill
from kernels.rotary import apply_rotary, build_cos_sin_cache, rope_inv_freq

__all__ = [
    "HAS_TRITON", "kernel_backend", "set_kernel_backend", "use_triton",
    "apply_rotary", "build_cos_sin_cache", "fused_add_layer_norm", "fused_add_rms_norm",
    "gelu_tanh", "layer_norm", "paged_attention_decode", "paged_attention_prefill",
    "rms_norm", "rope_inv_freq", "silu_and_mul", "write_kv_cache",
]
