"""Tensors of a GGUF file under their Hugging Face names, dequantized lazily per slice.

Each tensor becomes a `LazyTensor` over a `GGUFSource`: a rank's `narrow` picks its rows
(and columns, when they fall on quantization-block boundaries) and only those bytes are
read from the memory-mapped file and dequantized with `gguf`'s own numpy dequantizer, so a
tensor-parallel rank never dequantizes the whole matrix. llama.cpp's converter permutes the
rows of q and k within each head for Llama-family models (its RoPE pairs neighbours, HF's
pairs halves); reading undoes that, one head at a time.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from common.gguf_config import PERMUTED_QK
from common.gguf_file import GGUFError, GGUFFile, open_gguf
from worker.lazy_tensor import LazyTensor

_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_CONV1D = tuple(f"{m}.weight" for m in ("c_attn", "c_proj", "c_fc"))
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(arch: str, name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor, or None for one we do not know."""
    fixed, per_layer, prefix = ((_GPT2_NAMES, _GPT2_LAYER, "transformer.h") if arch == "gpt2"
                                else (_LLAMA_NAMES, _LLAMA_LAYER, "model.layers"))
    if name in fixed:
        return fixed[name]
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in per_layer:
        return None
    return f"{prefix}.{m.group(1)}.{per_layer[m.group(2)]}.{m.group(3)}"


class GGUFSource:
    """One GGUF tensor, indexed in HF layout ([out, in]); reads and dequantizes only a slice."""

    def __init__(self, f: GGUFFile, name: str, heads: int | None = None) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        self.file, self.name = f, name
        self.tensor = f.tensors[name]
        self.qtype = self.tensor.tensor_type
        self.shape = tuple(int(n) for n in reversed(self.tensor.shape.tolist()))
        self.heads = heads          # q/k: undo llama.cpp's per-head row permutation
        # F32 / F16 data arrive typed; every other type (BF16 included) as raw bytes per row.
        self.quantized = self.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        self.block, self.block_bytes = GGML_QUANT_SIZES[self.qtype]

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        if len(self.shape) == 1:
            return torch.from_numpy(self._dequantize(self._raw()[None, :])[0][index[0]].copy())
        rows, cols = index
        r0, r1, c0, c1 = rows.start or 0, rows.stop, cols.start or 0, cols.stop
        if self.heads is not None:   # widen to whole heads, unpermute, then cut
            head = self.shape[0] // self.heads
            h0, h1 = r0 // head * head, -(-r1 // head) * head
            out = _unpermute(self._rows(h0, h1, c0, c1), (h1 - h0) // head)
            return torch.from_numpy(np.ascontiguousarray(out[r0 - h0:r1 - h0]))
        return torch.from_numpy(np.ascontiguousarray(self._rows(r0, r1, c0, c1)))

    def _raw(self) -> np.ndarray:
        data = self.tensor.data
        return data.reshape(-1) if len(self.shape) == 1 and data.ndim > 1 else data

    def _rows(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        raw = self._raw()[r0:r1]
        if self.quantized and c0 % self.block == 0 and (c1 % self.block == 0
                                                        or c1 == self.shape[1]):
            # Column slices on block boundaries: read only those blocks' bytes.
            b0, b1 = c0 // self.block, -(-c1 // self.block)
            return self._dequantize(raw[:, b0 * self.block_bytes:b1 * self.block_bytes])
        return self._dequantize(raw)[:, c0:c1]

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        from gguf import dequantize
        try:
            out = dequantize(np.asarray(raw), self.qtype)
        except NotImplementedError:
            raise GGUFError(f"{self.file.path}: tensor {self.name!r} has quantization type "
                            f"{self.qtype.name}, which cannot be dequantized") from None
        out = out.astype(np.float32, copy=False)
        return out if out.flags.writeable else out.copy()   # F32 comes back as a mmap view


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` (convert_hf_to_gguf.py) for rows of whole heads."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_quant_types(f: GGUFFile) -> None:
    """Fail at load time, before any weight is read, on a quantization `gguf` cannot undo."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    bad = sorted({f"{t.name}: {t.tensor_type.name}" for t in f.tensors.values()
                  if t.tensor_type not in plain and t.tensor_type not in _type_traits})
    if bad:
        raise GGUFError(f"{f.path}: unsupported quantization type(s) for tensor(s) {bad[:4]}")


def iter_gguf(path: str) -> Iterator[tuple[str, LazyTensor]]:
    """(HF name, lazy tensor) for every tensor of the file, with a progress bar on a terminal."""
    f = open_gguf(path)
    check_quant_types(f)
    arch = f.architecture
    heads = {"attn_q": f.get(f"{arch}.attention.head_count"),
             "attn_k": f.get(f"{arch}.attention.head_count_kv",
                             f.get(f"{arch}.attention.head_count"))}
    for name in tqdm(list(f.tensors), desc=f"loading {f.path.name}", unit="tensor",
                     disable=None, leave=False):
        target = hf_name(arch, name)
        if target is None:
            raise GGUFError(f"{f.path}: tensor {name!r} has no counterpart in a {arch} model")
        m = _BLOCK.match(name)
        permuted = (arch in PERMUTED_QK and m is not None and m.group(2) in heads
                    and m.group(3) == "weight")
        source = GGUFSource(f, name, int(heads[m.group(2)]) if permuted else None)
        tensor = LazyTensor(source, source.shape)
        if arch == "gpt2" and target.endswith(_GPT2_CONV1D):
            tensor = tensor.t()   # HF's GPT-2 keeps these in Conv1D layout, [in, out]
        yield target, tensor
