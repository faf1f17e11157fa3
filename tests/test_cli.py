"""`stagemesh make-checkpoint` and `stagemesh generate` (reference engine), through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from stagemesh.cli import main
from support import hf_greedy, hf_model


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_make_checkpoint_writes_a_transformers_checkpoint(tmp_path):
    out = tmp_path / "m"
    result = run(
        "make-checkpoint",
        "--arch",
        "mixtral",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--shards",
        "3",
        "--dtype",
        "bfloat16",
        "--seed",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    model = hf_model(str(out), torch.bfloat16)
    assert model.config.num_local_experts == 8
    assert next(model.parameters()).dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 512 and tok.decode(tok("Hello world").input_ids) == "Hello world"


def test_generate_json_matches_transformers(checkpoint):
    path = checkpoint("qwen2")
    result = run(
        "generate",
        "--model",
        path,
        "--prompt-ids",
        "5,9,23,42",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--dtype",
        "float64",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["token_ids"] == hf_greedy(hf_model(path), [5, 9, 23, 42], 12)
    assert out["finish_reason"] == "length" and isinstance(out["text"], str)


def test_generate_text_streams(checkpoint):
    result = run("generate", "--model", checkpoint("llama"), "--prompt", "Hello world", "--max-tokens", "5")
    assert result.exit_code == 0
    assert "[length: 5 tokens]" in result.output


def test_generate_sampled_is_seeded(checkpoint):
    args = [
        "generate",
        "--model",
        checkpoint("llama"),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--json",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--seed",
        "3",
    ]
    assert json.loads(run(*args).output)["token_ids"] == json.loads(run(*args).output)["token_ids"]


def test_text_without_tokenizer_is_a_clear_error(checkpoint, tmp_path):
    import shutil

    d = Path(shutil.copytree(checkpoint("llama"), tmp_path / "m"))
    (d / "tokenizer.json").unlink()
    result = run("generate", "--model", str(d), "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 2
    assert "no tokenizer.json: send token ids (--prompt-ids)" in result.output
    ids = run("generate", "--model", str(d), "--prompt-ids", "1,2,3", "--max-tokens", "2", "--json")
    assert ids.exit_code == 0 and json.loads(ids.output)["text"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-ids", "1,2,9999"], "token ids must be in [0, 512); got 9999"),
        (["--prompt-ids", "1,x"], "expected comma-separated integers"),
        (["--prompt-ids", "1,2", "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["--prompt-ids", "1,2", "--max-tokens", "600"], "exceeds the context of 512"),
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt-ids", "1,2", "--top-p", "0"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_generate_input(checkpoint, args, message):
    result = run("generate", "--model", checkpoint("llama"), *args)
    assert result.exit_code == 2
    assert message in result.output
