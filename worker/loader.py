"""Load a model from a local Hugging Face directory, with errors that say exactly what is wrong.

A single GGUF file is read through `worker/gguf_loader.py` under the same HF names.
Tensors are visited one at a time from `model.safetensors` or from the shards listed in
`model.safetensors.index.json` as lazy slices: each parallel layer reads only its own part
(`worker/lazy_tensor.py`), and a pipeline stage skips other stages' layers unread, so a rank's
peak memory is its shard, never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open

from common.gguf_file import is_gguf
from common.model_config import ModelConfig, ModelConfigError
from worker.gguf_loader import iter_gguf
from worker.layers.linear import WeightShapeError
from worker.lazy_tensor import LazyTensor
from worker.models.registry import MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "half": torch.float16, "float": torch.float32}


class CheckpointError(ValueError):
    """The checkpoint's tensors do not fit the model: missing, extra or misshapen tensors."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, single-file or sharded."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelConfigError(f"model directory not found: {path}")
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing: {missing}")
        return files
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, LazyTensor]]:
    if is_gguf(model_dir):
        yield from iter_gguf(str(model_dir))
        return
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, LazyTensor.from_safetensors(f, name)


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint; raise on any mismatch."""
    params = dict(model.named_parameters())
    expected = {(name, shard) for name, p in params.items() for shard in p.shard_ids}
    loaded: set[tuple[str, object]] = set()
    extra: list[str] = []
    for ckpt_name, tensor in iter_checkpoint(model_dir):
        for name, shard, part in model.map_checkpoint_tensor(ckpt_name, tensor):
            if name not in params:
                extra.append(ckpt_name)
                continue
            param = params[name]
            try:
                param.weight_loader(param, part, shard)   # copy_ casts the dtype
            except WeightShapeError as e:
                raise CheckpointError(f"tensor {ckpt_name!r} has the wrong shape: {e}") from None
            loaded.add((name, shard))
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} tensor(s) the model does not use: "
                              f"{sorted(set(extra))[:8]}")
    missing = sorted(f"{n}" + (f" [{s}]" if s is not None else "") for n, s in expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {missing[:8]}")


def load_model(config: ModelConfig, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> nn.Module:
    """Build the model for `config` and load its weights from `config.model_dir`."""
    torch_dtype = parse_dtype(dtype)
    cls = MODELS.get(config.family)
    if cls is None:
        raise ModelConfigError(f"unsupported architecture {config.architecture!r}; "
                               f"supported are {sorted(MODELS)}")
    with torch.device(device):
        model = cls(config, torch_dtype)
    load_weights(model, config.model_dir)
    return model.eval()
