"""Tessera: distributed LLM inference. The offline API lives here.

    from tessera import LLM, SamplingParams

Names load lazily so that `tessera --help` and `import tessera.client` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

_LAZY = {"LLM": "tessera.llm", "SamplingParams": "common.sampling_params",
         "RequestOutput": "tessera.outputs", "CompletionOutput": "tessera.outputs"}

if TYPE_CHECKING:
    from common.sampling_params import SamplingParams
    from tessera.llm import LLM
    from tessera.outputs import CompletionOutput, RequestOutput


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")
