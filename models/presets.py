"""Shapes of the random-weight checkpoints `stagemesh make-checkpoint` writes, as Hugging Face config.json dicts.

`tiny` runs in milliseconds and still exercises every feature (GQA, tp > KV heads at tp=4, Llama-3 RoPE
scaling, Qwen2 biases and tied embeddings, Mistral's sliding window, Mixtral's 8 experts top-2);
`small` is for quick demos; `bench` (~250M parameters) is what the benchmarks measure; `experts` is a
Mixtral whose experts are as large as `bench`'s MLPs (hidden 1024, 8 experts of 2816, 2 layers, a short
vocabulary: ~150M parameters, ~140M of them experts), for expert parallelism where the experts' work, not
the dispatch, dominates a layer.
"""

from __future__ import annotations

from stagemesh.errors import InvalidArgument

ARCHS = ("llama", "mistral", "qwen2", "mixtral")
PRESETS = ("tiny", "small", "bench", "experts")
MOE_PRESETS = ("experts",)  # shapes for the mixtral arch only

_SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, context
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=704,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "experts": dict(
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=2816,  # per expert
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
}

_ARCH = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"],
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
    ),
}


def hf_config(arch: str, preset: str, dtype: str = "float32") -> dict:
    """The config.json of a generated checkpoint."""
    if arch not in ARCHS:
        raise InvalidArgument(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise InvalidArgument(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if preset in MOE_PRESETS and arch != "mixtral":
        raise InvalidArgument(f"preset {preset!r} is a Mixtral shape: use --arch mixtral")
    shape = dict(_SHAPES[preset])
    if arch == "mixtral" and preset in ("small", "bench"):
        shape["intermediate_size"] = shape["hidden_size"]  # 8 experts of this size keep `bench` near 300M
        shape["num_hidden_layers"] = max(4, shape["num_hidden_layers"] // 2)
    config = {
        "model_type": arch,
        **shape,
        **_ARCH[arch],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        # Llama-3.1 style frequency scaling, with a short original context so tiny prompts cross its bands.
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": min(8192, shape["max_position_embeddings"] // 8),
        }
    if arch == "mistral":
        config["sliding_window"] = 24 if preset == "tiny" else 4096
    return config
