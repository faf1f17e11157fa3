"""Writes random-weight checkpoints in Hugging Face layout (config.json, safetensors, tokenizer.json).

Tests and benchmarks use these instead of downloads: the same files load in `transformers`, which is
the oracle the mesh is checked against.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from stagemesh.errors import InvalidArgument
from stagemesh.models.config import ModelConfig, hf_shape
from stagemesh.models.dtypes import serving_dtype
from stagemesh.models.presets import hf_config

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1 (bos), 2 (eos), as in Llama


def checkpoint_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor a Hugging Face checkpoint of this config holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv" if config.qkv_bias]
        names += [f"{p}self_attn.o_proj.bias"] if config.o_bias else []
        if config.is_moe:
            names.append(p + "block_sparse_moe.gate.weight")
            names += [
                f"{p}block_sparse_moe.experts.{j}.{w}.weight"
                for j in range(config.num_local_experts)
                for w in ("w1", "w2", "w3")
            ]
        else:
            names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            names += [f"{p}mlp.{x}_proj.bias" for x in ("gate", "up", "down") if config.mlp_bias]
    return names


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) through the stack and logits are well spread."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in checkpoint_tensor_names(config):
        shape = hf_shape(config, name)
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        tensors[name] = t
    return tensors


def make_checkpoint(
    out: str | Path, arch: str, preset: str, seed: int = 0, dtype: str = "float32", shards: int = 1
) -> Path:
    if shards < 1:
        raise InvalidArgument(f"--shards must be >= 1, got {shards}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(arch, preset, dtype)
    config = ModelConfig.from_hf_dict(raw)
    tensors = {k: v.to(serving_dtype(dtype)).contiguous() for k, v in random_weights(config, seed).items()}
    _write_weights(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generation = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(out, config.vocab_size)
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for name in names:  # contiguous groups of about total / shards bytes each
        groups[min(shards - 1, running * shards // total)].append(name)
        running += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a small generated corpus, padded with filler tokens to vocab_size so
    every id a random model emits decodes to something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f" w{i}" for i in range(missing)])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 1 << 30,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


_TEXT = (
    "The mesh splits a model too large for one device into stages and ranks. Each stage holds a range of "
    "layers and the key value cache of those layers; each rank holds a slice of every weight matrix. "
    "Tokens flow from the gateway to the first stage, through every stage, and the last stage samples "
    'the next token. Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026. Punctuation, quotes "like '
    'this", (brackets) and new\nlines.\n'
)


def _corpus(lines: int = 4000) -> list[str]:
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    corpus = [_TEXT] * 20
    for _ in range(lines):
        words = ("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12))
        corpus.append(" ".join(words))
    return corpus
