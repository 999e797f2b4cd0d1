"""Pipeline-parallel helpers for models: which layers this stage holds, and a placeholder for
the others so that layer indices (and checkpoint names) stay global."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

from worker.parallel import get_pp_stage


class MissingLayer(nn.Module):
    """A layer another pipeline stage holds: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def stage_layers(num_layers: int, make: Callable[[int], nn.Module]
                 ) -> tuple[nn.ModuleList, int, int]:
    """(all layers, this stage's start, end): real layers in [start, end), placeholders
    elsewhere."""
    start, end = get_pp_stage().layer_range(num_layers)
    layers = nn.ModuleList(make(i) if start <= i < end else MissingLayer()
                           for i in range(num_layers))
    return layers, start, end


_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a checkpoint tensor belongs to ("model.layers.3.mlp..." -> 3), or None."""
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None
