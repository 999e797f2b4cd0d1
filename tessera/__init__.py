"""Tessera: distributed LLM inference. The offline API lives here."""

from tessera.llm import LLM
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
