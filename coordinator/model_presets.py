"""Models the planner knows by name, with their published shapes, and how `--model` text becomes a
ModelShape: a checkpoint directory, a preset name, or a bare size ("175B") that borrows the nearest
published dense shape and scales its parameter counts to exactly that size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from stagemesh.coordinator.model_shape import ModelShape
from stagemesh.errors import InvalidArgument
from stagemesh.models.config import ModelConfig

_LLAMA = dict(model_type="llama", tie_word_embeddings=False, rms_norm_eps=1e-5)
_MIXTRAL = dict(
    model_type="mixtral",
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)

# The fields of each model's published config.json that fix its parameter count and KV size.
_HF_CONFIGS = {
    "Llama-2-7B": dict(
        _LLAMA,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "Llama-2-13B": dict(
        _LLAMA,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "Llama-2-70B": dict(
        _LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "Llama-3-405B": dict(
        _LLAMA,
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
    "Mixtral-8x7B": dict(
        _MIXTRAL,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "Mixtral-8x22B": dict(
        _MIXTRAL,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        vocab_size=32768,
        max_position_embeddings=65536,
    ),
}

# GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, d_model 12288, 96 heads of 128, a 4*d GELU MLP,
# learned positions for 2048 tokens, biases on every linear and LayerNorm, GPT-2's 50257-token vocabulary
# with a tied head. 174.6B parameters.
GPT3_175B = ModelShape(
    name="GPT-3-175B",
    layers=96,
    hidden=12288,
    heads=96,
    kv_heads=96,
    head_dim=128,
    intermediate=4 * 12288,
    vocab=50257,
    max_context=2048,
    mlp_matrices=2,
    learned_positions=True,
    biases=True,
    tied=True,
)

_ALIASES = {"gpt3": "GPT-3-175B", "gpt3175b": "GPT-3-175B", "llama31405b": "Llama-3-405B"}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([mbt])\s*$", re.IGNORECASE)
_SIZE_UNITS = {"m": 1e6, "b": 1e9, "t": 1e12}
BORROW_RANGE = 3.0  # a bare size borrows a shape at most this many times smaller or larger


def preset_names() -> list[str]:
    return [*_HF_CONFIGS, GPT3_175B.name]


def preset(name: str) -> ModelShape | None:
    """A preset by name, ignoring case and punctuation ("llama-2-70b", "GPT-3 175B")."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    by_key = {re.sub(r"[^a-z0-9]", "", n.lower()): n for n in preset_names()}
    found = by_key.get(key) or _ALIASES.get(key)
    if found is None:
        return None
    if found == GPT3_175B.name:
        return GPT3_175B
    return ModelShape.from_config(ModelConfig.from_hf_dict(_HF_CONFIGS[found]), found)


def parse_size(text: str) -> float | None:
    """'175B' -> 175e9 parameters; None when `text` is not a bare size."""
    m = _SIZE.match(text)
    return float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()] if m else None


def shape_for_size(params: float, text: str) -> ModelShape:
    """A dense model of exactly `params` parameters, shaped like the nearest published dense preset."""
    dense = [s for s in (preset(n) for n in preset_names()) if not s.is_moe]
    nearest = min(dense, key=lambda s: abs(_log_ratio(params, s.total_params)))
    ratio = params / nearest.total_params
    if not 1 / BORROW_RANGE <= ratio <= BORROW_RANGE:
        raise InvalidArgument(
            f"--model {text}: no published shape within {BORROW_RANGE:g}x of {params / 1e9:g}B parameters "
            f"(nearest: {nearest.name}); give a checkpoint directory or a preset"
        )
    return nearest.scaled_to(params, f"{text.strip()} dense")


def resolve_model(text: str) -> ModelShape:
    """--model: a checkpoint directory, a preset name, or a bare size like 175B."""
    if Path(text).is_dir():
        return ModelShape.from_config(ModelConfig.from_dir(text), Path(text).name)
    found = preset(text)
    if found is not None:
        return found
    params = parse_size(text)
    if params is not None and params > 0:
        return shape_for_size(params, text)
    raise InvalidArgument(
        f"unknown model {text!r}: not a checkpoint directory, a preset ({', '.join(preset_names())}) "
        f"or a size like 175B"
    )


def _log_ratio(a: float, b: float) -> float:
    return math.log(a / b)
