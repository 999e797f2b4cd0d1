"""The C++ CPU kernels (kernels/csrc/): built with torch.utils.cpp_extension on first use.

The build is cached under `TESSERA_EXT_DIR` (default ~/.cache/tessera/ext) in a directory
named by a hash of the sources, the compile flags, the torch version and the CPU's vector
extensions: it is compiled with -march=native, so a build made on an AVX-512 machine is never
loaded on an AVX2 one. Concurrent first uses share one build (an flock, which a killed build
does not leave behind). When the compiler is missing or the build fails, `cpu_ops()` returns
None once, with a warning, and the callers run the torch references instead.
`TESSERA_CPU_EXT=0` turns the extension off.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from kernels._triton import kernel_backend

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention_cpu.cpp", "elementwise_cpu.cpp", "kv_write_cpu.cpp")]
# headers the sources include: part of the build's name, so an edit to one rebuilds
_HEADERS = [Path(__file__).parent / "csrc" / name
            for name in ("vec.h", "attention_chunk.h")]
# -fopenmp: at::parallel_for is a header template, OpenMP-backed only when compiled so (the
# libgomp torch loads is the one the extension then uses: one thread team per process)
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
_VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                 "avx512_fp16", "amx_tile")


def _cpu_vector_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return ",".join(x for x in _VECTOR_FLAGS if x in have)
    except OSError:
        pass
    return "unknown"


def _build_name() -> str:
    h = hashlib.sha256()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + [torch.__version__, _cpu_vector_flags()]).encode())
    return f"tessera_cpu_{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def cpu_ops():
    """`torch.ops.tessera_cpu` once the extension is built and loaded, else None."""
    if os.environ.get("TESSERA_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        root = Path(os.environ.get("TESSERA_EXT_DIR", Path.home() / ".cache" / "tessera" / "ext"))
        build_dir = root / name
        build_dir.mkdir(parents=True, exist_ok=True)
        built = build_dir / f"{name}.so"
        # cpp_extension's own lock is a file that a build killed midway leaves behind, and
        # every later load then waited on it forever. An flock dies with its holder: whoever
        # holds it is the only builder, so a leftover lock file is stale and goes, and a
        # library found under it is finished (the name hashes sources and flags) and loads
        # directly, unless a killed link left it unloadable: then it is rebuilt.
        with open(root / f"{name}.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            if built.exists():
                try:
                    torch.ops.load_library(str(built))
                    return torch.ops.tessera_cpu
                except (OSError, RuntimeError) as e:
                    logger.warning("rebuilding the C++ CPU kernels: %s", e)
            cpp_extension.load(name=name, sources=[str(s) for s in _SOURCES],
                               extra_cflags=_CFLAGS, extra_ldflags=["-lm", "-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False,
                               verbose=False)
        return torch.ops.tessera_cpu
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        logger.warning("the C++ CPU kernels could not be built (%s): using the torch references",
                       str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None


CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_cpu_kernels(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs its C++ CPU kernel: all on the CPU in one dtype of
    float32, bfloat16 or float16 (the kernels compute in float32 and round where the torch
    references do), the `auto` kernel backend (`torch` keeps the references) and an extension
    that built."""
    return (all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)
            and tensors[0].dtype in CPU_KERNEL_DTYPES
            and kernel_backend() == "auto" and cpu_ops() is not None)
