"""A pretend CUDA device on the CPU, for the code paths that must keep their tensors on the
logits' device (the sampler): no GPU needed to catch a host index meeting device logits.

Inside `FakeCuda()`, tensors made by `put` (and everything computed from them, or created with
`device=` one of their devices) live "on the device": their `.device` says cuda, and any op
that mixes them with a host tensor of one or more dimensions raises, where PyTorch on a real
GPU would raise or silently copy through the host. Copies (`copy_`, `.to`) may cross, as on a
GPU; host reads (`.tolist()`, `bool()`) are allowed (they are syncs there, not errors); copies to the
host (`.cpu()`, `.to("cpu")`) are recorded in `to_host`. The
data stays on the CPU, so results compare exactly with a plain CPU run.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("cuda", 0)
_MARK = "_on_fake_cuda"
_CROSSING = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu}


def _resident(t: object) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _is_fake(d: object) -> bool:
    return (isinstance(d, torch.device) and d.type == "cuda") or (
        isinstance(d, str) and d.startswith("cuda"))


class DeviceMixError(AssertionError):
    """A host tensor met a device tensor in one op."""


class FakeCuda(TorchFunctionMode):
    """A TorchFunctionMode that plays a CUDA device (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixes: list[str] = []
        self.to_host: list[tuple[int, ...]] = []   # shapes of device tensors copied to the host

    @staticmethod
    def _mark(out: object) -> object:
        def mark(t: object) -> object:
            if isinstance(t, torch.Tensor):
                setattr(t, _MARK, True)
            return t
        return tree_map(mark, out)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of host tensor t on the pretend device."""
        return self._mark(t.detach().clone())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return FAKE if _resident(args[0]) else func(*args)
        if func == torch.Tensor.is_cuda.__get__:
            return _resident(args[0]) or func(*args)
        to_device = False
        if _is_fake(kwargs.get("device")):
            kwargs["device"], to_device = "cpu", True
        if func is torch.Tensor.to and any(_is_fake(a) for a in args[1:]):
            args, to_device = tuple("cpu" if _is_fake(a) else a for a in args), True
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if _resident(t)]
        if on_device and func not in _CROSSING:
            host = [t for t in tensors if not _resident(t) and t.dim() > 0]
            if host:
                msg = (f"{getattr(func, '__name__', func)}: host tensor(s) "
                       f"{[tuple(t.shape) for t in host]} mixed with device tensor(s) "
                       f"{[tuple(t.shape) for t in on_device]}")
                self.mixes.append(msg)
                raise DeviceMixError(msg)
        out = func(*args, **kwargs)
        if on_device and (func is torch.Tensor.cpu or func is torch.Tensor.to and any(
                str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))):
            self.to_host.append(tuple(args[0].shape))
            return out.clone() if out is args[0] else out   # a host copy, unmarked
        if to_device and isinstance(out, torch.Tensor) and any(out is t for t in tensors):
            out = out.clone()   # .to() returned its (host) input: the device copy is new
        if to_device or on_device:
            self._mark(out)
        return out
