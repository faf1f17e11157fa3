"""TP = 2 and 4 in real gloo process groups give the reference engine's logits (float64, <= 1e-9)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from stagemesh.models.config import ModelConfig
from stagemesh.models.engine import ReferenceEngine
from support import PROMPTS, run_ranks


@pytest.mark.parametrize(
    "arch,tp",
    [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen2", 4), ("mistral", 2), ("mixtral", 2), ("mixtral", 4)],
)
def test_tp_matches_reference(checkpoint, tmp_path, arch, tp):
    path = checkpoint(arch)
    out = tmp_path / "logits.safetensors"
    run_ranks("tp_logits.py", tp, [path, str(out), *(",".join(map(str, p)) for p in PROMPTS)])
    ours = load_file(out)["logits"]
    ref = torch.cat(ReferenceEngine(path, dtype=torch.float64).prompt_logits(PROMPTS))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-9


def test_tiny_preset_has_tp_beyond_kv_heads(checkpoint):
    """tp=4 above replicates KV heads: the tiny preset has 2 of them."""
    assert ModelConfig.from_dir(checkpoint("llama")).num_key_value_heads == 2


def test_shared_memory_collectives_refuse_more_ranks_than_their_header_holds(tmp_path):
    from stagemesh.stage_worker.shm_collectives import MAX_RANKS, ShmCollectives

    with pytest.raises(ValueError, match=f"hold 1..{MAX_RANKS} ranks; got rank 0 of {MAX_RANKS + 1}"):
        ShmCollectives(str(tmp_path / "segment"), 0, MAX_RANKS + 1, 1024, create=True)
    assert ShmCollectives(str(tmp_path / "segment"), 0, MAX_RANKS, 1024, create=True).size == MAX_RANKS
