"""An expert worker's compute: its experts of every MoE layer, called with the tokens routed to them.
Grouped per expert (one matmul per expert, models.layers.Experts), and counted per expert per layer."""

from __future__ import annotations

import time

import torch
from stagemesh.errors import InvalidArgument
from torch import nn


class ExpertEngine:
    def __init__(self, layers: nn.ModuleDict, num_experts: int, hidden_size: int) -> None:
        self.layers = layers  # {"layer": Experts holding this worker's expert ids}
        self.hidden_size = hidden_size
        held = next(iter(layers.values())).expert_ids
        self.expert_ids = list(held)
        self._local = torch.full((num_experts,), -1, dtype=torch.long)  # global id -> index in this group
        self._local[torch.tensor(held)] = torch.arange(len(held))
        self.tokens = torch.zeros(len(layers), len(held), dtype=torch.long)  # (layers, held experts)
        self.calls = 0
        self.busy_seconds = 0.0
        first = next(next(iter(layers.values())).parameters())
        self.dtype, self.device = first.dtype, first.device

    def check(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        if str(layer) not in self.layers:
            raise InvalidArgument(f"layer {layer} does not exist (the model has {len(self.layers)} MoE layers)")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise InvalidArgument(f"hidden states must be (tokens, {self.hidden_size}), got {list(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise InvalidArgument(f"hidden states must be {str(self.dtype)[6:]}, got {str(hidden.dtype)[6:]}")
        if ids.dtype != torch.int64 or not weights.is_floating_point():
            raise InvalidArgument(
                f"expert_ids must be int64 and weights floating point, got {ids.dtype}, {weights.dtype}"
            )
        if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
            raise InvalidArgument(
                f"expert_ids {list(ids.shape)} and weights {list(weights.shape)} must be (tokens, k) for "
                f"{hidden.shape[0]} tokens"
            )
        wanted = ids[ids >= 0]
        outside = wanted[(wanted >= len(self._local)) | (self._local[wanted.clamp(max=len(self._local) - 1)] < 0)]
        if outside.numel():
            held = ",".join(map(str, self.expert_ids))
            raise InvalidArgument(f"expert {int(outside[0])} is not held by this worker (it holds {held})")

    @torch.inference_mode()
    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden (T, D), ids (T, K) global (-1 = not here), weights (T, K) -> weighted sums (T, D)."""
        start = time.perf_counter()
        local = torch.where(ids >= 0, self._local[ids.clamp(min=0)], -1).to(self.device)
        hidden, weights = hidden.to(self.device), weights.to(self.device)
        counted = local[local >= 0]
        self.tokens[layer] += torch.bincount(counted, minlength=len(self.expert_ids)).cpu()
        out = self.layers[str(layer)](hidden, local, weights)
        self.calls += 1
        self.busy_seconds += time.perf_counter() - start
        return out
