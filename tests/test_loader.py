"""Sharded loading reads only a worker's slices; bad checkpoints get a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stagemesh.errors import CheckpointError
from stagemesh.models.config import ModelConfig
from stagemesh.models.loader import build_model
from stagemesh.models.plan import ParallelPlan
from stagemesh.models.tp import TPRank


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_tp2_pp2_shard_loads_a_quarter(checkpoint, arch):
    path = checkpoint(arch)
    config = ModelConfig.from_dir(path)
    plan = ParallelPlan.build(config, tp=2, pp=2)
    full, _ = build_model(path, dtype=torch.float64)
    full_layer_params = _layer_params(full)
    for stage in plan.stages:
        for rank in range(plan.tp):
            model, reader = build_model(path, stage, TPRank(rank, plan.tp), dtype=torch.float64)
            expected = plan.stage_param_count(config, stage.index, rank)
            assert sum(p.numel() * p.element_size() for p in model.parameters()) == expected * 8
            assert reader.bytes_read == expected * 4  # the file is float32: nothing read beyond the shard
            # Half the layers, half of each: a quarter of the layer bytes (norms are whole on each rank).
            assert _layer_params(model) / full_layer_params == pytest.approx(0.25, abs=0.01)


def _layer_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("/nonexistent/model")


def test_missing_config(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        build_model(d)


def test_unsupported_model_type(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        build_model(d)


def test_no_weights(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        build_model(d)


def test_pickle_weights_refused(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match="pickled weights \\(pytorch_model.bin\\); stagemesh loads safetensors only"
    ):
        build_model(d)


def test_missing_tensor(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.2.mlp.up_proj.weight'"):
        build_model(d)


def test_wrong_shape(checkpoint, tmp_path):
    d = _copy(checkpoint("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.1.self_attn.q_proj.weight' has shape \[32, 64\] in the checkpoint; config.json implies \[64, 64\]",
    ):
        build_model(d)


def test_index_names_missing_file(checkpoint, tmp_path):
    d = _copy(checkpoint("llama", shards=2), tmp_path / "m")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names missing file"):
        build_model(d)
