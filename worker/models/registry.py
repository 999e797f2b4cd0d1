"""Model family -> our model class. The HF `architectures` names and their families are
common/model_config.py's ARCHITECTURES (the one list); adding a model is a line in each."""

from __future__ import annotations

import torch.nn as nn

from worker.models.gpt2 import GPT2LMHeadModel
from worker.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}
