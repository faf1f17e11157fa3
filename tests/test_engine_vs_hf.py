"""The reference engine equals Hugging Face transformers on the same files (float64: 1e-9, same tokens)."""

from __future__ import annotations

import pytest
import torch
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.requests import GenerationRequest
from support import PROMPTS, hf_greedy, hf_logits, hf_model

ARCHS = ["llama", "qwen2", "mistral", "mixtral"]


def check_against_hf(path: str) -> None:
    hf = hf_model(path)
    engine = ReferenceEngine(path, dtype=torch.float64)
    # One batched prefill of prompts of different lengths, against HF one prompt at a time.
    for prompt, ours in zip(PROMPTS, engine.prompt_logits(PROMPTS)):
        ref = hf_logits(hf, prompt)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-9
    requests = [GenerationRequest(tuple(p), 32, ignore_eos=True) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, engine.generate(requests)):
        assert result.token_ids == hf_greedy(hf, prompt, 32)
        assert result.finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_generated_checkpoint_matches_transformers(checkpoint, arch):
    check_against_hf(checkpoint(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_saved_checkpoint_matches(tmp_path, arch):
    """Checkpoints written by transformers' own save_pretrained, not by our tool (HF 5 config layout)."""
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    configs = {
        "llama": transformers.LlamaConfig(
            **common,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**common, sliding_window=16),
        "mixtral": transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch])
    with torch.no_grad():
        for name, p in model.named_parameters():  # HF's init is too flat for greedy decoding to mean much
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path)
    check_against_hf(str(tmp_path))


def test_sharded_checkpoint_with_index(checkpoint):
    check_against_hf(checkpoint("llama", shards=3))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_lower_precision_matches_transformers(checkpoint, dtype, tol):
    path = checkpoint("llama")
    hf = hf_model(path, dtype)
    engine = ReferenceEngine(path, dtype=dtype)
    for prompt, ours in zip(PROMPTS, engine.prompt_logits(PROMPTS)):
        ref = hf_logits(hf, prompt).float()
        assert ours.dtype == dtype
        assert (ours.float() - ref).abs().max().item() <= tol


def test_stop_conditions(checkpoint):
    engine = ReferenceEngine(checkpoint("llama"), dtype=torch.float64)
    free = engine.generate([GenerationRequest((5, 9, 23), 8, ignore_eos=True)])[0]
    stop_at = free.token_ids[3]
    stopped = engine.generate([GenerationRequest((5, 9, 23), 8, stop_token_ids=(stop_at,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
