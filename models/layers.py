"""The building blocks of a Llama-family decoder layer, in plain torch: no I/O, no parallelism.

Numerics follow Hugging Face transformers exactly where it matters for bit-level agreement: RMSNorm
and the router softmax compute in float32, rotary angles are float32 and cast to the activation dtype.
Legend: N = tokens in the step, D = hidden size, H / KV = query / key-value heads (local to a TP rank
once sharded), Dh = head dim, I = intermediate size, E = experts, K = experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from stagemesh.models.batch import StepBatch
from stagemesh.models.config import ModelConfig
from stagemesh.models.kv_cache import PagedKVCache
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight: transformers' formula; the fused
        # kernel gives the same bits (tests compare float64 logits with transformers at 1e-9).
        normed = torch.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(Dh/2,) float32 inverse frequencies, with linear or Llama-3 scaling when the config asks."""
    dim, rope = config.head_dim, config.rope_scaling
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq = rope_inv_freq(config)  # kept off the module's state so a meta-device build keeps it
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) -> cos, sin (N, Dh) in `dtype`."""
        inv_freq = self._by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._by_device.setdefault(positions.device, self._inv_freq.to(positions.device))
        freqs = positions[:, None].float() * inv_freq  # (N, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, Dh)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, Dh), cos/sin (N, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """Grouped-query attention over a paged KV cache; q/k/v are one fused projection."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer]
        qkv_out = config.q_size + 2 * config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.kv_cache: PagedKVCache | None = None  # created by Transformer.allocate_kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, h, kv = x.shape[0], self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(n, h + 2 * kv, self.head_dim)  # (N, H + 2KV, Dh)
        qk = apply_rotary(qkv[:, : h + kv], cos, sin)  # q and k heads rotated together: (N, H + KV, Dh)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]  # (N, H, Dh), (N, KV, Dh), (N, KV, Dh)
        self.kv_cache.update(k, v, batch.slot_mapping)
        out = self._attend(q, k, v, batch)  # (N, H, Dh)
        return self.o_proj(out.reshape(n, h * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if batch.decode_only:
            return self._decode(q, batch)
        out = torch.empty_like(q)
        if batch.decode_rows.numel():
            out[batch.decode_rows] = self._decode(q[batch.decode_rows], batch)
        for p in batch.prefills:
            rows = slice(p.token_start, p.token_start + p.num_tokens)
            qp = q[rows].transpose(0, 1)[None]  # (1, H, Tq, Dh)
            if p.start_pos == 0:  # the whole prefix is in this step: attend to its fresh k, v
                kp, vp = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]  # (1, KV, Tq, Dh)
            else:
                kp, vp = self.kv_cache.gather(p.kv_slots[None])  # (1, KV, Tk, Dh)
            mask = _prefill_mask(p.start_pos, p.num_tokens, kp.shape[2], self.sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
            out[rows] = o[0].transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """q (Bd, H, Dh) of single-token chunks -> (Bd, H, Dh), one padded batch over the paged cache.

        Plain tensor math rather than scaled_dot_product_attention: at a query length of 1 the CPU flash
        kernel with a mask costs 1.7x (float32) to 2.3x (bfloat16) of this (8 sequences x 16 heads x 64 keys,
        one thread), and under --compile inductor fuses it. Scores, softmax and the weighted sum run in
        float32 or wider (float64 stays float64); query head h reads KV head h // (H / KV), as in GQA."""
        kd, vd = self.kv_cache.gather(batch.decode_slots)  # (Bd, KV, T, Dh)
        acc = torch.promote_types(q.dtype, torch.float32)
        mask = batch.decode_mask(self.sliding_window, acc)  # (Bd, 1, 1, T)
        b, kv = q.shape[0], kd.shape[1]
        qg = q.view(b, kv, -1, self.head_dim).to(acc)  # (Bd, KV, G, Dh)
        scores = torch.matmul(qg, kd.to(acc).transpose(-1, -2)) * self.scale + mask  # (Bd, KV, G, T)
        out = torch.matmul(scores.softmax(dim=-1), vd.to(acc))  # (Bd, KV, G, Dh)
        return out.to(q.dtype).view(b, -1, self.head_dim)


def _prefill_mask(start: int, tq: int, tk: int, window: int | None, device) -> torch.Tensor | None:
    """(Tq, Tk) causal mask offset by `start`; None when plain causal attention (is_causal) is exact."""
    if start == 0 and window is None:
        return None
    q_pos = torch.arange(start, start + tq, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, I) each
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """A group of SwiGLU experts stored stacked; computation is grouped per expert, never per token."""

    def __init__(self, expert_ids: list[int], hidden: int, intermediate: int) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.w13 = nn.Parameter(torch.empty(len(expert_ids), 2 * intermediate, hidden))  # (E, 2I, D)
        self.w2 = nn.Parameter(torch.empty(len(expert_ids), hidden, intermediate))  # (E, D, I)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D), ids / weights (T, K) with ids local to this group (-1: not here) -> weighted sum (T, D)."""
        k = ids.shape[1]
        flat, flat_weights = ids.reshape(-1), weights.reshape(-1)  # (T*K,)
        picks = (flat >= 0).nonzero()[:, 0]  # routing-table positions this group serves
        picks = picks[flat[picks].argsort(stable=True)]  # grouped by expert
        counts = torch.bincount(flat[picks], minlength=len(self.expert_ids)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = picks[start : start + count]  # (Te,)
            start += count
            tokens = rows // k
            y = self.expert_forward(e, x[tokens]) * flat_weights[rows, None]  # (Te, D)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)  # (Te, I) each
        return F.linear(F.silu(gate) * up, self.w2[e])


class SparseMoE(nn.Module):
    """Mixtral block: softmax router, top-k, renormalised weights, experts (local or remote)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts: nn.Module = Experts(
            list(range(config.num_local_experts)), config.hidden_size, config.intermediate_size
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> expert ids (T, K) and float32 weights (T, K) that sum to 1 per token."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (T, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return self.experts(x, ids, weights)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            SparseMoE(config) if config.is_moe else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        # Under TP (models.tp) the two all-reduces of a layer are forward hooks on the row-parallel o_proj and
        # down_proj (or on the whole MoE block): this code stays the same at any tp.
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return h.add_(self.mlp(self.post_attention_layernorm(h)))
