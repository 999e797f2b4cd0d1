"""`tessera convert x.gguf DIR`: a GGUF file as a Hugging Face model directory.

Writes config.json and generation_config.json (from the metadata), model.safetensors (every
tensor dequantized, q/k un-permuted, under HF names), tokenizer.json and
tokenizer_config.json (with the chat template), for tools that want a directory. Tessera
itself serves the .gguf file directly; the output is what transformers loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import gguf_config
from common.gguf_file import open_gguf
from common.gguf_tokenizer import build_gguf_tokenizer

# NOTE: torch and the worker's loader are imported inside convert(): the CLI builds its
# parser (add_arguments) in every process it starts, and the gateway, scheduler and serve
# processes must not pay torch's import (seconds, hundreds of MB) for it.
DTYPES = ("bfloat16", "float16", "float32")


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the HF directory for `gguf_path` into `out_dir` (created); returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    import torch
    from safetensors.torch import save_file

    from worker.gguf_loader import iter_gguf

    f = open_gguf(gguf_path)
    config = {**gguf_config.hf_config(f), "torch_dtype": dtype}
    tokenizer = build_gguf_tokenizer(f)
    tensors: dict[str, "torch.Tensor"] = {}
    for name, lazy in iter_gguf(str(gguf_path)):
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        tensors[name] = lazy.materialize().to(getattr(torch, dtype)).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(gguf_config.generation_config(f), indent=2) + "\n")
    (out / "tokenizer.json").write_text(tokenizer.backend_json)
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer.tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF file to convert")
    p.add_argument("out_dir", metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="stored dtype of the dequantized weights (default: float32)")


def main(args: argparse.Namespace) -> int:
    out = convert(args.gguf_file, args.out_dir, args.dtype)   # GGUFError is a ValueError
    print(f"wrote {out} ({args.dtype}) from {args.gguf_file}")
    return 0
