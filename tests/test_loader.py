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
from stagemesh.models.loader import CheckpointReader, build_model, load_shard
from stagemesh.models.plan import ParallelPlan
from stagemesh.models.tp import COLWISE, TP_PLAN, TPRank, apply_tensor_parallel
from stagemesh.models.transformer import Transformer
from torch import nn


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


def test_a_module_added_to_tp_plan_is_sharded_and_loaded_through_the_table_alone(checkpoint, monkeypatch):
    """One TP_PLAN entry is all it takes: the sharder gives the module its rank's rows and the loader fills
    them from the checkpoint tensor the entry names (here a toy copy of up_proj)."""
    path = checkpoint("llama")
    reader = CheckpointReader(path)
    config = reader.config
    monkeypatch.setitem(TP_PLAN, "mlp.toy_proj", (COLWISE, ("mlp.up_proj",)))
    tp = TPRank(rank=1, size=2)
    with torch.device("meta"):
        model = Transformer(config)
        for layer in model.layers.values():
            layer.mlp.toy_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        apply_tensor_parallel(model, tp)
    load_shard(model, reader, tp, torch.float64)
    half = config.intermediate_size // 2
    full = load_file(Path(path) / "model.safetensors")["model.layers.3.mlp.up_proj.weight"]
    toy = model.layers["3"].mlp.toy_proj.weight
    assert toy.shape == (half, config.hidden_size)
    assert torch.equal(toy, full[half:].double())


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
