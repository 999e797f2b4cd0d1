"""HF `architectures` name -> our model class. Adding a model is one line here."""

from __future__ import annotations

import torch.nn as nn

from worker.models.gpt2 import GPT2LMHeadModel
from worker.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
