"""Model configuration: the shapes of a decoder-only transformer, parsed from a Hugging Face `config.json`.

Imports no torch, so the coordinator and the planner can read a checkpoint's shapes without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` in HF 4 configs, `rope_parameters` in HF 5)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one checkpoint; field names follow Hugging Face's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # Qwen2 always has q/k/v biases; Llama may have them on every projection (`attention_bias`).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-layer sliding window (None: full attention). Mistral applies it to every layer, Qwen2 to some.
    sliding_windows: tuple[int | None, ...] = ()
    # Mixtral: experts per MoE layer and experts chosen per token (0 experts = dense model).
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise CheckpointError(
                f"config.json: {len(self.sliding_windows)} layer types for {self.num_hidden_layers} layers"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{str(path)!r} has no config.json (expected a Hugging Face model directory)")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            return cls._parse(model_type, raw)
        except KeyError as e:
            raise CheckpointError(f"config.json for {model_type} lacks the field {e.args[0]!r}") from None

    @classmethod
    def _parse(cls, model_type: str, raw: dict) -> ModelConfig:
        heads = raw["num_attention_heads"]
        layers = raw["num_hidden_layers"]
        rope_theta, rope_scaling = _parse_rope(raw)
        eos = raw.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
            sliding_windows=_parse_sliding_windows(model_type, raw, layers),
            num_local_experts=raw.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) if model_type == "mixtral" else 0,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype") or "float32",
        )


def _parse_rope(raw: dict) -> tuple[float, RopeScaling]:
    """Reads HF 4 (`rope_theta` + `rope_scaling`) and HF 5 (`rope_parameters`) layouts alike."""
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )
    return float(theta), scaling


def _parse_sliding_windows(model_type: str, raw: dict, layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if model_type == "qwen2":
        if not raw.get("use_sliding_window", False):
            return (None,) * layers
        types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", layers) else "full_attention"
            for i in range(layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in types)
    if model_type == "llama":
        return (None,) * layers
    return (window,) * layers


def hf_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The full shape Hugging Face stores tensor `name` with, derived from the config."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
    is_bias = name.endswith(".bias")
    out_in = {
        "q_proj": (config.q_size, h),
        "k_proj": (config.kv_size, h),
        "v_proj": (config.kv_size, h),
        "o_proj": (h, config.q_size),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
        "w1": (inter, h),
        "w3": (inter, h),
        "w2": (h, inter),
        "gate": (config.num_local_experts, h),
        "embed_tokens": (v, h),
        "lm_head": (v, h),
    }
    if leaf in out_in:
        return (out_in[leaf][0],) if is_bias else out_in[leaf]
    return (h,)  # norms
