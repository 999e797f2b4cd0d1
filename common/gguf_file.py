"""Open a GGUF file (llama.cpp's format) once per process, with errors that name the file.

`gguf` (llama.cpp's own Python package) parses the header and memory-maps the tensor data;
nothing here reads a tensor. The config builder (`common/gguf_config.py`), the tokenizer
builder (`common/gguf_tokenizer.py`) and the worker's weight loader (`worker/gguf_loader.py`)
all read the same cached `GGUFFile`, so a process parses a file's header once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any


class GGUFError(ValueError):
    """A GGUF file is unreadable or describes something we cannot serve; says which file and field."""


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path to a single GGUF file (what `--model` accepts besides a directory)."""
    return str(path).lower().endswith(".gguf")


class GGUFFile:
    """The parsed header of one GGUF file: metadata fields and tensor descriptors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"GGUF file not found: {self.path}")
        try:
            from gguf import GGUFReader
        except ImportError as e:   # a runtime dependency; say so instead of a bare ImportError
            raise GGUFError(f"reading {self.path} needs the `gguf` package (pip install gguf)") from e
        try:
            self.reader = GGUFReader(str(self.path), "r")
        except Exception as e:   # gguf raises ValueError, struct/numpy errors on a cut-off file
            raise GGUFError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from None
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{self.path} is truncated: tensor {t.name!r} ends at byte "
                                f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, int, float, bool or list), or `default`."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata field {key!r} is corrupt: {e}") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata field {key!r}")
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The cached `GGUFFile` for `path` (re-read when the file changes)."""
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    st = p.stat()
    return _open(str(p.resolve()), st.st_mtime_ns, st.st_size)
