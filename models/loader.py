"""Loads one worker's shard of a Hugging Face safetensors checkpoint, slice by slice.

`CheckpointReader` opens the files lazily (safetensors `get_slice`: only the bytes asked for are read).
`load_shard` walks a built (possibly TP-reshaped, meta-device) model and fills every parameter from the
checkpoint pieces the TP plan names for it. Pickled weights (`*.bin`, `*.pt`) are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from stagemesh.errors import CheckpointError
from stagemesh.models.config import ModelConfig, hf_shape
from stagemesh.models.layers import Experts
from stagemesh.models.plan import StageSpec, vocab_range
from stagemesh.models.tp import (
    MOE_TP_PLAN,
    ROWWISE,
    TP_PLAN,
    TPRank,
    apply_tensor_parallel,
    part_rows,
    row_parallel_cols,
)
from stagemesh.models.transformer import Transformer
from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Piece:
    """Rows and/or columns of one checkpoint tensor (None = all of that dimension)."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


class CheckpointReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = ModelConfig.from_dir(self.path)
        self._file_of = self._index()
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds pickled weights ({', '.join(pickles)}); stagemesh loads safetensors only. "
                    "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
                )
            raise CheckpointError(f"{self.path} has no *.safetensors weight files")
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index.name} names missing file(s): {', '.join(missing)}")
            return dict(weight_map)
        if len(files) > 1:
            raise CheckpointError(f"{self.path} has {len(files)} safetensors files but no model.safetensors.index.json")
        with safe_open(str(self.path / files[0]), framework="pt") as f:
            return {name: files[0] for name in f.keys()}

    def _slice(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {self.path} lacks tensor {name!r}")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file].get_slice(name)

    def read(self, piece: Piece, expected_shape: tuple[int, ...]) -> torch.Tensor:
        """Reads only the slice `piece` names, after checking the tensor's full shape."""
        sl = self._slice(piece.name)
        shape = tuple(sl.get_shape())
        if shape != expected_shape:
            raise CheckpointError(
                f"tensor {piece.name!r} has shape {list(shape)} in the checkpoint; "
                f"config.json implies {list(expected_shape)}"
            )
        rows = slice(*piece.rows) if piece.rows else slice(None)
        if len(shape) == 1:
            tensor = sl[rows]
        else:
            tensor = sl[rows, slice(*piece.cols) if piece.cols else slice(None)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def param_pieces(config: ModelConfig, name: str, module: nn.Module, tp: TPRank) -> list[list[Piece]]:
    """Checkpoint pieces of our parameter `name`: an outer list stacked on a new dim 0 (experts),
    inner lists concatenated along dim 0 (fused projections)."""
    if name in ("embed_tokens.weight", "lm_head.weight"):
        source = "lm_head.weight" if name == "lm_head.weight" and not config.tie_word_embeddings else None
        rows = vocab_range(config.vocab_size, tp.size, tp.rank)
        return [[Piece(source or "model.embed_tokens.weight", rows=rows)]]
    if name == "norm.weight":
        return [[Piece("model.norm.weight")]]
    _, index, path = name.split(".", 2)
    prefix = f"model.layers.{index}."
    module_path, _, leaf = path.rpartition(".")
    if config.is_moe and module_path == "mlp.experts":
        return _expert_pieces(config, f"{prefix}block_sparse_moe.experts.", leaf, module.expert_ids, tp)
    if module_path == "mlp.gate":
        return [[Piece(f"{prefix}block_sparse_moe.gate.weight")]]
    if module_path in TP_PLAN:
        style, parts = TP_PLAN[module_path]
        suffix = "bias" if leaf in ("bias", "row_bias") else "weight"
        if style == ROWWISE:
            cols = row_parallel_cols(config, parts[0], tp.size, tp.rank) if suffix == "weight" else None
            return [[Piece(f"{prefix}{parts[0]}.{suffix}", cols=cols)]]
        return [[Piece(f"{prefix}{p}.{suffix}", rows=part_rows(config, p, tp.size, tp.rank)) for p in parts]]
    return [[Piece(f"{prefix}{path}")]]  # layer norms


def _expert_pieces(config: ModelConfig, prefix: str, leaf: str, expert_ids: list[int], tp: TPRank) -> list[list[Piece]]:
    style, parts = MOE_TP_PLAN[f"mlp.experts.{leaf}"]
    if style == ROWWISE:
        cols = row_parallel_cols(config, "w2", tp.size, tp.rank)
        return [[Piece(f"{prefix}{j}.w2.weight", cols=cols)] for j in expert_ids]
    rows = part_rows(config, "w1", tp.size, tp.rank)
    return [[Piece(f"{prefix}{j}.{p}.weight", rows=rows) for p in parts] for j in expert_ids]


def load_shard(model: nn.Module, reader: CheckpointReader, tp: TPRank, dtype: torch.dtype, device="cpu") -> int:
    """Fills every parameter of `model` from the checkpoint; returns the parameter bytes now held."""
    config = reader.config
    loaded: dict[int, nn.Parameter] = {}  # shared (tied) parameters are loaded once and stay shared
    modules = dict(model.named_modules())
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        if id(param) not in loaded:
            value = _read_param(reader, config, name, module, tp)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{name}: checkpoint pieces give {list(value.shape)}, expected {list(param.shape)}"
                )
            loaded[id(param)] = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
        setattr(module, attr, loaded[id(param)])
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _read_param(reader: CheckpointReader, config: ModelConfig, name: str, module: nn.Module, tp: TPRank):
    stacked = []
    for group in param_pieces(config, name, module, tp):
        tensors = [reader.read(piece, hf_shape(config, piece.name)) for piece in group]
        stacked.append(tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0))
    return torch.stack(stacked) if isinstance(module, Experts) else stacked[0]


def build_model(
    path: str | Path,
    stage: StageSpec | None = None,
    tp: TPRank = TPRank(),
    dtype: torch.dtype = torch.float32,
    device="cpu",
    remote_experts: Callable[[int], nn.Module] | None = None,
) -> tuple[Transformer, CheckpointReader]:
    """Builds the slice of the model `stage` owns (all of it when None), shards it for `tp` and loads it.

    remote_experts(layer) replaces each MoE layer's experts (expert parallelism: the stage keeps the router).
    """
    reader = CheckpointReader(path)
    config = reader.config
    with torch.device("meta"):
        if stage is None:
            model = Transformer(config)
        else:
            model = Transformer(config, stage.layers, stage.has_embedding, stage.has_head)
        if remote_experts is not None and config.is_moe:
            for index, layer in model.layers.items():
                layer.mlp.experts = remote_experts(int(index))
        apply_tensor_parallel(model, tp)
    load_shard(model, reader, tp, dtype, device)
    return model.eval(), reader


def load_experts(
    path: str | Path, expert_ids: list[int], dtype: torch.dtype = torch.float32, device="cpu"
) -> tuple[nn.ModuleDict, CheckpointReader]:
    """Only the experts `expert_ids` of every MoE layer (an expert worker's share): {"layer": Experts}."""
    reader = CheckpointReader(path)
    config = reader.config
    with torch.device("meta"):
        layers = nn.ModuleDict(
            {
                str(i): nn.ModuleDict(
                    {
                        "mlp": nn.ModuleDict(
                            {"experts": Experts(expert_ids, config.hidden_size, config.intermediate_size)}
                        )
                    }
                )
                for i in range(config.num_hidden_layers)
            }
        )
        holder = nn.ModuleDict({"layers": layers})  # parameter names match the checkpoint's: layers.{i}.mlp.experts.*
    load_shard(holder, reader, TPRank(), dtype, device)
    return nn.ModuleDict({i: layers[i]["mlp"]["experts"] for i in layers}), reader
