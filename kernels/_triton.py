"""Optional Triton, the backend switch, and the checks every launcher makes.

Triton is an optional dependency (`pip install .[triton]`): without it `kernels` still imports
and every op runs its torch reference. The `@triton.jit` kernels are defined at module level
either way; without Triton `jit` returns a stub that raises when launched.

Backend choice (`TESSERA_KERNELS`, read once at import, or `set_kernel_backend`):
  auto   - CUDA tensors go to the Triton kernel, CPU tensors to the torch reference (default);
  triton - always Triton: CPU tensors too, which needs TRITON_INTERPRET=1 set before Triton is
           first imported (the kernel tests run so);
  torch  - always the reference, e.g. to compare against the kernels on a GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn: Callable[..., Any]) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            raise RuntimeError(f"{self.fn.__name__} needs Triton: pip install '.[triton]'")

    class _MissingTriton:
        @staticmethod
        def jit(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]  # kernel annotations are strings, never evaluated

BACKENDS = ("auto", "triton", "torch")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_backend = os.environ.get("TESSERA_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"TESSERA_KERNELS must be one of {BACKENDS}, not {_backend!r}")
_warned_no_triton = False


def set_kernel_backend(name: str) -> None:
    """Switch every op between Triton and torch for the rest of the process (see module doc)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, not {name!r}")
    _backend = name


def kernel_backend() -> str:
    return _backend


def use_triton(x: torch.Tensor | torch.device | str) -> bool:
    """Whether an op on tensor x (its main input), or on tensors of device x, runs the Triton
    kernel."""
    global _warned_no_triton
    is_cuda = x.is_cuda if isinstance(x, torch.Tensor) else torch.device(x).type == "cuda"
    if _backend == "torch" or (_backend == "auto" and not is_cuda):
        return False
    if not HAS_TRITON:
        if _backend == "triton":
            raise RuntimeError("TESSERA_KERNELS=triton but Triton is not installed")
        if not _warned_no_triton:
            logger.warning("CUDA tensors but no Triton installed: running the torch references")
            _warned_no_triton = True
        return False
    return True


# Checks shared by the launchers: each raises ValueError naming the op and the argument.

def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {msg}")


def check_device(op: str, *tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    check(all(t.device == dev for t in tensors), op,
          f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    check(dev.type == "cuda" or INTERPRET, op,
          f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    check(t.dtype in (torch.float32, torch.float16, torch.bfloat16), op,
          f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_index(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    check(t.dtype in (torch.int32, torch.int64), op, f"{name} must be int32 or int64, got {t.dtype}")
    check(t.dim() == ndim, op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.stride(-1) == 1 or t.shape[-1] <= 1, op, f"{name} must be contiguous in its last dim")


def check_rows(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """t has exactly `shape` and contiguous trailing dims; its first (row) stride may be any."""
    check(tuple(t.shape) == tuple(shape), op, f"{name} must have shape {tuple(shape)}, "
          f"got {tuple(t.shape)}")
    inner = 1
    for size, stride in reversed(list(zip(t.shape[1:], t.stride()[1:]))):
        check(stride == inner or size == 1, op,
              f"{name} must be contiguous apart from its first dim, got strides {t.stride()}")
        inner *= size


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
